"""When the fleet may stop: RoundGoal over the task listing, and `--eval-rounds all`."""

import pytest

from client_sim import cli, rounds
from fcp_server.protos import task_pb2

Status = task_pb2.TaskStatus


def _task(task_id: int, done: int, status: int, *, evaluation: bool = False) -> task_pb2.Task:
    task = task_pb2.Task(task_id=task_id, completed_iterations=done, status=status)
    if evaluation:
        task.info.evaluation_info.training_task_id = 1
    else:
        task.info.training_info.SetInParent()
    return task


def test_training_goal_and_eval_round_count():
    goal = rounds.RoundGoal(rounds=3, eval_rounds=2)
    assert not goal.reached(
        [_task(1, 3, Status.COMPLETED), _task(2, 1, Status.OPEN, evaluation=True)]
    )
    assert goal.reached([_task(1, 3, Status.COMPLETED), _task(2, 2, Status.OPEN, evaluation=True)])
    assert not goal.reached([_task(1, 2, Status.OPEN), _task(2, 5, Status.OPEN, evaluation=True)])


def test_eval_until_end_waits_for_both_tasks_to_end():
    goal = rounds.RoundGoal(rounds=3, eval_until_end=True)
    # Many eval rounds done, but the eval task has not evaluated the final result yet.
    assert not goal.reached(
        [_task(1, 3, Status.COMPLETED), _task(2, 9, Status.OPEN, evaluation=True)]
    )
    assert not goal.reached(
        [_task(1, 2, Status.OPEN), _task(2, 2, Status.COMPLETED, evaluation=True)]
    )
    assert goal.reached(
        [_task(1, 3, Status.COMPLETED), _task(2, 4, Status.COMPLETED, evaluation=True)]
    )


def test_cli_parses_eval_rounds_all():
    parser = cli.build_parser()
    args = parser.parse_args(
        ["--server", "x", "--population", "p", "--rounds", "1", "--eval-rounds", "all"]
    )
    assert args.eval_rounds == cli.EVAL_UNTIL_END
    assert (
        parser.parse_args(["--server", "x", "--population", "p", "--rounds", "1"]).eval_rounds == 0
    )
    with pytest.raises(SystemExit):
        parser.parse_args(
            ["--server", "x", "--population", "p", "--rounds", "1", "--eval-rounds", "-2"]
        )
