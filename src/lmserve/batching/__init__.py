"""lmserve.batching"""
