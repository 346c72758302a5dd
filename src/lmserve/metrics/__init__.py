"""lmserve.metrics"""
