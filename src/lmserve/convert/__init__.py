"""lmserve.convert"""
