"""lmserve.bench"""
