"""Import path of the managed LMI/DJL containers' Python handler API, served by lmserve.

A ``model.py`` written for those containers (``from djl_python import Input, Output``) runs
unchanged under lmserve: these names are lmserve's own ``lmserve.handlers.io`` classes.
"""

from lmserve.handlers.io import Input, Output

__all__ = ["Input", "Output"]
