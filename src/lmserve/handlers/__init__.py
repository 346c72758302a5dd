"""lmserve.handlers"""
