"""The shared test harness (importable as `harness`: pyproject puts tests/ on the path).

tiny.py     tiny models and datasets that follow the training contracts
runs.py     script command lines for tiny runs, their environment, prepared datasets
child.py    a test file run as a fresh process (`FILE --child`), its RESULT line
graphs.py   structure of traced TensorFlow graphs
"""
