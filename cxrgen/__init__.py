"""cxrgen: labelled synthetic chest X-ray datasets from report sentences."""
from cxrgen.errors import CxrgenError

__version__ = "0.1.0"

__all__ = ["CxrgenError", "__version__"]
