"""``EditingDDPStrategy``: Lightning's DDP strategy for editing.

Lightning starts the processes (one per device, on one or many nodes, under torchrun or
SLURM), initialises the process group, and saves checkpoints from rank 0, as for any DDP
run. The one difference: the LightningModule is not wrapped in DistributedDataParallel. The
language model is frozen, no parameter takes a gradient (DDP refuses such a module), and the
ranks exchange what an edit needs through `lightning_alphaedit.collective.Collective`.
"""

from __future__ import annotations

from pytorch_lightning.strategies import DDPStrategy


class EditingDDPStrategy(DDPStrategy):
    """Lightning's DDP for editing: processes, process group, samplers, checkpoints on rank 0,
    SLURM/torchrun environments as usual, but the frozen model is not wrapped in
    DistributedDataParallel (there are no gradients to all-reduce; the callback exchanges
    what the edit needs). Use with ``Trainer(use_distributed_sampler=False)``: every rank must
    see the whole edit batch; evaluation is sharded by the data module itself.

    In a config: ``trainer.strategy: {class_path: lightning_alphaedit.strategy.EditingDDPStrategy}``
    (``init_args: {process_group_backend: gloo}`` on CPUs).
    """

    strategy_name = "ddp_editing"

    def configure_ddp(self) -> None:
        pass  # keep the LightningModule itself: nothing of it is trained by gradients
