"""The Slurm job state TorchX follows when the cluster has no accounting storage (scontrol's view)."""

from __future__ import annotations

from torchx.specs import AppState

from pipeline.launch.slurm import describe_from_scontrol, fit_to_partition, parse_scontrol

RUNNING = "JobId=7 JobName=train-0 UserId=root(0) JobState=RUNNING Reason=None Dependency=(null) NumNodes=1"
DONE = "JobId=7 JobName=train-0 JobState=COMPLETED Reason=None ExitCode=0:0"
HET = "\n".join(
    [
        "JobId=9 HetJobId=9 HetJobOffset=0 JobName=trainer-0 JobState=COMPLETED ExitCode=0:0",
        "JobId=10 HetJobId=9 HetJobOffset=1 JobName=trainer-1 JobState=FAILED ExitCode=1:0",
    ]
)


def test_one_line_per_job_becomes_its_fields() -> None:
    (job,) = parse_scontrol(RUNNING + "\n")
    assert job["JobId"] == "7" and job["JobName"] == "train-0" and job["JobState"] == "RUNNING"
    assert parse_scontrol("slurm_load_jobs error: Invalid job id specified\n") == []


def test_states_map_to_torchx_and_the_worst_component_wins() -> None:
    assert describe_from_scontrol("7", parse_scontrol(RUNNING)).state == AppState.RUNNING
    done = describe_from_scontrol("7", parse_scontrol(DONE))
    assert done.state == AppState.SUCCEEDED and done.msg == "COMPLETED"
    assert [(r.name, r.num_replicas) for r in done.roles] == [("train", 1)]
    het = describe_from_scontrol("9", parse_scontrol(HET))
    assert het.state == AppState.FAILED and het.roles[0].num_replicas == 2
    assert describe_from_scontrol("8", []) is None


def test_the_sweep_launchers_watcher_reads_array_tasks_from_scontrol() -> None:
    from hydra_plugins.pipeline_torchrun_launcher.slurm_sweep import _scontrol_watcher

    text = (
        "JobId=12 ArrayJobId=11 ArrayTaskId=1 JobName=train JobState=RUNNING NodeList=vm\n"
        "JobId=11 ArrayJobId=11 ArrayTaskId=0 JobName=train JobState=COMPLETED NodeList=vm\n"
        "JobId=5 JobName=other JobState=PENDING NodeList=(null)\n"
    )
    info = _scontrol_watcher().read_info(text)
    assert info["11_0"]["State"] == "COMPLETED" and info["11_1"]["State"] == "RUNNING"
    assert info["5"] == {"JobID": "5", "State": "PENDING", "NodeList": "(null)"}


def test_roles_larger_than_the_partitions_nodes_are_fitted_to_them() -> None:
    from torchx.specs import AppDef, Resource, Role

    app = AppDef("train", roles=[Role("train", image="", resource=Resource(cpu=4, gpu=0, memMB=8192))])
    assert fit_to_partition(app, (2, 20000)) == ["train: 4 CPUs / 8192 MB per node -> 2 / 8192 (the partition's nodes)"]
    assert (app.roles[0].resource.cpu, app.roles[0].resource.memMB) == (2, 8192)
    assert fit_to_partition(app, (64, 512000)) == [] and app.roles[0].resource.cpu == 2
