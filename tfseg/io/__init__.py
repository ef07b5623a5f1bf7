"""tfseg's one I/O layer: files on any filesystem (:mod:`~tfseg.io.fs`), one writer per output
(:mod:`~tfseg.io.locks`), ownership and publishing of outputs (:mod:`~tfseg.io.publish`), and the
named fault points the production tests stop a process at (:mod:`~tfseg.io.faults`)."""
