"""Slurm: a thin, tested translation from a config's ``slurm`` section to sbatch scripts.

``gap slurm submit CONFIG --out RUN`` writes ``RUN/slurm/{config.yaml,capture.sbatch,
analysis.sbatch}`` (:mod:`slurm.render` renders them, :mod:`slurm.submit` submits them): a capture
job array with one task per shard, each probing its node first (:mod:`slurm.probe`) and running
``gap capture ... --shard I/N --resume``, and an analysis job with ``--dependency=afterok`` on the
array. ``gap slurm status RUN`` (:mod:`slurm.status`) shows samples done / failed / left per shard
and the job states.

Time limits and preemption: a task receives SIGUSR1 ``slurm.signal_seconds`` before its limit,
commits and requeues itself; a preempted task is requeued by Slurm (``--requeue``). After a task
was cancelled or failed, run the same ``gap slurm submit`` again: only the shards with samples
left are resubmitted, and they resume from the store.
"""
