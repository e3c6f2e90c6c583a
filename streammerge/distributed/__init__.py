"""One merge over many processes or machines: the plan is split into tasks of whole tensors (`split`), each task
merges its tensors in its own process and writes them at their offsets into output files the driver created
(`task`), and the driver runs the tasks on local worker processes or a Ray cluster and commits the output only
when every task succeeded (`driver`, `executors`). No tensor data passes through the driver."""
