"""Small shared helpers: logging and the user cache directory."""

from swift.utils.logging import get_logger
from swift.utils.paths import cache_dir

__all__ = ["cache_dir", "get_logger"]
