"""lmserve.server"""
