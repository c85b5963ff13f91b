"""Crash recovery (issue 9, item 1): SIGKILL the web server and the worker at 50+ points.

Runs `crash_campaign` against gunicorn + `fcp-server worker` on SQLite and on PostgreSQL, then
`crash_checks.verify`. The figures are printed (run with -s to see them). A longer soak with
more kill points: `tools/crash_soak.sh`.
"""

import collections
import os

import pytest

from tests.integration.reliability import crash_campaign, crash_checks

# FCP_CRASH_REPEATS scales the campaign (tools/crash_soak.sh); the default is 54 kill points:
# each of the 16 armed points 3 times, and 6 SIGKILLs at random moments.
REPEATS = int(os.environ.get("FCP_CRASH_REPEATS", "3"))
RANDOM_KILLS = int(os.environ.get("FCP_CRASH_RANDOM_KILLS", str(2 * REPEATS)))


@pytest.mark.slow
@pytest.mark.timeout(60 * (16 * REPEATS + RANDOM_KILLS))
def test_every_round_survives_sigkills_at_fifty_plus_points(db_url, tmp_path):
    # Arrange
    config = crash_campaign.Config(
        repeats=REPEATS,
        random_kills=RANDOM_KILLS,
        seed=int.from_bytes(os.urandom(2), "big"),  # printed below, to replay a failure
        deadline_s=45.0 * (16 * REPEATS + RANDOM_KILLS),
    )
    assert config.planned_kills >= 50
    campaign = crash_campaign.Campaign(db_url, tmp_path, config)

    # Act
    result = campaign.run()

    # Assert
    by_point = collections.Counter(f"{k.kind}:{k.point}" for k in result.kills)
    print(f"\ncrash campaign on {db_url.split(':')[0]} (seed {config.seed}):")
    for point, count in sorted(by_point.items()):
        print(f"  {point:42s} {count}")
    figures = crash_checks.verify(result, db_url, campaign.blobs, config)
    survived = sum(1 for k in result.kills if k.task_id in result.task_ids)
    print(
        f"  kill points: {len(result.kills)} fired, {survived} survived; "
        f"{figures.rounds} rounds in {len(result.task_ids)} tasks all completed, "
        f"{figures.accepted_updates} acknowledged updates each counted exactly once; "
        f"{figures.snapshots_compared} outputs seen mid-close republished identically; "
        f"noise std {figures.noise_std:.4f} over {figures.noise_samples} samples, none reused; "
        f"{figures.temp_files_left} orphaned temp files, most claims per round "
        f"{figures.max_apply_attempts}; {result.ledger.transport_errors} device transport "
        f"errors, statuses {dict(result.ledger.statuses)}; {result.elapsed_s:.0f} s"
    )
    assert len(result.kills) == config.planned_kills
    assert survived == len(result.kills)
