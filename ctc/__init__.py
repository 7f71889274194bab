"""ctc: compress, then compile.  Capture a PyTorch model into a graph IR, compress it
with composable passes, and lower it through Apache TVM."""

__version__ = "0.1.0"
