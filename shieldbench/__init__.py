"""shieldbench: backdoor and poisoning attacks on CLIP, and the defenses against them."""

from shieldbench import builtins as _builtins  # noqa: F401  (registers built-in plugins lazily)

__version__ = "0.1.0"
