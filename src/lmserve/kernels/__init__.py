"""lmserve.kernels"""
