"""lmserve.models"""
