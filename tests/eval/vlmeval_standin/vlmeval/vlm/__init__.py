from .base import BaseModel  # noqa: F401
__all__ = ["BaseModel"]
