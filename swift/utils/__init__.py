"""Small shared helpers: logging, the user cache directory, and the machine's CPU facts."""

from swift.utils.logging import get_logger
from swift.utils.machine import cpu_info, cpu_summary
from swift.utils.paths import cache_dir

__all__ = ["cache_dir", "cpu_info", "cpu_summary", "get_logger"]
