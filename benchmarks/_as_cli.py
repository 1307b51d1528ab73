"""Imported first by every benchmark: the process opts in to the settings the ``mtlrec`` command
uses (``mtlrec.utils.runtime.enable_process_tuning``: pyarrow's system memory pool, chosen before
pyarrow loads; glibc allocator tuning; memory released between phases), so that the figures are
the command's."""

from mtlrec.utils.runtime import enable_process_tuning

enable_process_tuning()
