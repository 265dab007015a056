"""What object-storage run directories rest on, checked against a real
S3-compatible server (tests/s3_server.py): DCP's sharded format written and read through fsspec,
and the conditional create that can stand in for a rename when a checkpoint is committed."""

import pytest
import torch

from tests.s3_server import s3  # noqa: F401 - the fixture

pytestmark = pytest.mark.slow


# One process without a group, on purpose: DCP says it assumes so (even when told, with no_dist).
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled, unavailable or uninitialized:UserWarning")
def test_dcp_round_trips_a_sharded_checkpoint_through_s3_exactly(s3):  # noqa: F811
    import s3fs
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

    state = {"model": {"w": torch.randn(64, 32, dtype=torch.float64), "b": torch.arange(7)}, "step": 12}
    dcp.save(state, storage_writer=FsspecWriter("s3://runs/job/checkpoints/step-00000012"))
    loaded = {"model": {"w": torch.zeros(64, 32, dtype=torch.float64), "b": torch.zeros(7, dtype=torch.int64)},
              "step": 0}
    dcp.load(loaded, storage_reader=FsspecReader("s3://runs/job/checkpoints/step-00000012"))
    assert all(torch.equal(loaded["model"][k], state["model"][k]) for k in ("w", "b"))
    assert loaded["step"] == 12
    fs = s3fs.S3FileSystem(endpoint_url=s3["AWS_ENDPOINT_URL"])
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls("runs/job/checkpoints/step-00000012")) == [".metadata",
                                                                                               "__0_0.distcp"]


def test_a_conditional_create_lets_exactly_one_writer_commit(s3):  # noqa: F811
    import boto3
    from botocore.exceptions import ClientError

    client = boto3.client("s3", endpoint_url=s3["AWS_ENDPOINT_URL"])
    client.put_object(Bucket="runs", Key="job/checkpoints/step-00000012/COMMITTED", Body=b"first", IfNoneMatch="*")
    with pytest.raises(ClientError, match="PreconditionFailed"):
        client.put_object(Bucket="runs", Key="job/checkpoints/step-00000012/COMMITTED", Body=b"second",
                          IfNoneMatch="*")
    body = client.get_object(Bucket="runs", Key="job/checkpoints/step-00000012/COMMITTED")["Body"].read()
    assert body == b"first"  # the loser changed nothing
