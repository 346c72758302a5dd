"""lmserve.store"""
