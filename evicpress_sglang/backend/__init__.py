"""The SGLang side: the ``evicpress`` radix-cache backend."""
