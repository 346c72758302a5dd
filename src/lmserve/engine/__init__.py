"""lmserve.engine"""
