"""A device's record of the rounds it contributed to (Android's TaskHistory).

The min-separation policy is evaluated on the device against this history (the reference
server does not enforce it), so each simulated device keeps its own, keyed like the Android
client by (population, task id).
"""

from dataclasses import dataclass, field

# A device remembers at most this many contributions per task (Android keeps a bounded table).
MAX_ROUNDS_PER_TASK = 1000


@dataclass
class ContributionHistory:
    """The rounds one device has contributed to, per (population, task id)."""

    # (population, task_id) -> contributed round ids, oldest first.
    _rounds: dict[tuple[str, str], list[int]] = field(default_factory=dict)

    def record(self, population: str, task_id: str, round_id: int) -> None:
        """Records a completed contribution (called once the update was uploaded).

        Raises:
          ValueError: for an empty population/task id or a negative round.
        """
        if not population or not task_id:
            raise ValueError("population and task_id must be non-empty")
        if round_id < 0:
            raise ValueError(f"round ids are non-negative: {round_id}")
        rounds = self._rounds.setdefault((population, task_id), [])
        rounds.append(round_id)
        del rounds[:-MAX_ROUNDS_PER_TASK]

    def last_round(self, population: str, task_id: str) -> int | None:
        """The most recent round this device contributed to for the task, or None."""
        rounds = self._rounds.get((population, task_id))
        return max(rounds) if rounds else None

    def rounds(self, population: str, task_id: str) -> list[int]:
        """All remembered contributed rounds for the task, oldest first."""
        return list(self._rounds.get((population, task_id), []))

    def total(self) -> int:
        """Number of remembered contributions over all tasks."""
        return sum(len(r) for r in self._rounds.values())
