"""The dora op: naive.py (the math), op.py (the registered op and its orchestration), triton.py, cuda.py."""
