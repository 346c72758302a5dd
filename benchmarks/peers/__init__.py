"""Helpers of the benchmarks that measure lmserve against other systems (OpenVINO GenAI, llama.cpp)."""
