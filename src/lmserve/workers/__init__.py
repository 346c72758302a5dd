"""lmserve.workers"""
