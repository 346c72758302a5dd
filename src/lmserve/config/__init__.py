"""lmserve.config"""
