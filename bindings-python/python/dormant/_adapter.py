"""What the agent-framework adapters (dormant.smolagents, dormant.deepagents) share: which
sandbox backs an adapter, and the persistence calls on it."""

from __future__ import annotations

from ._errors import InvalidArgument
from ._sandbox import Sandbox, StrPath, Tier


def open_sandbox(
    tier: Tier,
    *,
    snapshot_id: str | None,
    template: str | None,
    sandbox: Sandbox | None,
    store: StrPath | None,
    image: str | None = None,
    memory_mib: int | None = None,
) -> Sandbox:
    """The sandbox an adapter runs on: ``sandbox`` as it is, ``snapshot_id`` resumed, a new
    one from ``template``, else a new one (on ``image`` for the KVM tier). Raises
    :class:`InvalidArgument` when more than one of the first three is given or the sandbox is
    not on ``tier``, and dormant's errors for a snapshot or template that cannot be used."""
    given = [name for name, value in (("snapshot_id", snapshot_id), ("template", template),
                                      ("sandbox", sandbox)) if value is not None]
    if len(given) > 1:
        raise InvalidArgument(
            f"give at most one of snapshot_id, template and sandbox, not {' and '.join(given)}"
        )
    if sandbox is not None:
        sb = sandbox
    elif snapshot_id is not None:
        sb = Sandbox.resume(snapshot_id, store=store)
    elif template is not None:
        sb = Sandbox.create(tier, template=template, store=store, memory_mib=memory_mib)
    elif tier == "kvm":
        sb = Sandbox.create(image=image, store=store, memory_mib=memory_mib)
    else:
        sb = Sandbox.create(tier, store=store, memory_mib=memory_mib)
    if sb.tier != tier:
        raise InvalidArgument(f"this adapter runs on the {tier} tier, and {sb!r} is not")
    return sb


class Persistent:
    """The persistence calls of an adapter backed by ``self.sandbox``."""

    sandbox: Sandbox

    @property
    def snapshot_id(self) -> str | None:
        """The latest snapshot (None before any checkpoint or standby)."""
        return self.sandbox.snapshot_id

    def checkpoint(self) -> str:
        """Writes a snapshot of the sandbox and returns its id; the sandbox keeps running."""
        return self.sandbox.checkpoint()

    def standby(self) -> str:
        """Puts the sandbox to sleep on disk (no CPU, no memory) and returns the snapshot id to
        pass as ``snapshot_id=`` to a later adapter. The next call on this one wakes it too."""
        return self.sandbox.standby()
