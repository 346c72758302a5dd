"""lmserve.client"""
