"""Built-in passes, one module each. Importing this package registers them."""
from . import flash  # noqa: F401
from . import gqa  # noqa: F401
from . import share_layers  # noqa: F401
from . import factorize_embeddings  # noqa: F401
from . import bf16  # noqa: F401
from . import heal  # noqa: F401
from . import checkpoint  # noqa: F401
from . import tensor_parallel  # noqa: F401
from . import fuse  # noqa: F401
