"""lmserve.parallel"""
