"""torch.distributed's key-value stores, imported from where their types are declared.

``torch.distributed`` re-exports them at run time but not to type checkers (torch 2.13).
"""

from torch._C._distributed_c10d import PrefixStore, Store, TCPStore

__all__ = ["PrefixStore", "Store", "TCPStore"]
