"""Datasets versioned with DVC on a real S3 server (SeaweedFS on loopback): round trips and an outage."""

import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from botocore.exceptions import EndpointConnectionError
from dvc.repo import Repo
from PIL import Image

from ssl_models.data import read_idx
from tests.s3_server import SeaweedS3

pytestmark = [
    pytest.mark.slow,
    pytest.mark.usefixtures("isolated_dvc"),
    # dvc 3.67 still reads pygtrie's deprecated `.value`; nothing this project can change.
    pytest.mark.filterwarnings("ignore:_NoneStep.value:DeprecationWarning"),
]

N_IMAGES = 200
REMOTE = "storage"


@pytest.fixture(scope="session")
def fashion_pngs(fashion_mnist_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 Fashion-MNIST test images as PNG files."""
    folder = tmp_path_factory.mktemp("fashion_pngs")
    for i, pixels in enumerate(read_idx(fashion_mnist_dir / "t10k-images-idx3-ubyte.gz")[:N_IMAGES]):
        Image.fromarray(pixels).save(folder / f"{i:04d}.png")
    return folder


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def git(*args: str, cwd: Path) -> str:
    identity = ["-c", "user.name=ssl-pipeline tests", "-c", "user.email=tests@localhost"]
    out = subprocess.run(["git", *identity, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def init_dvc_repo(path: Path, images: Path, server: SeaweedS3, bucket: str) -> Repo:
    """A git + DVC repo with ``images/`` and an S3 remote whose credentials live only in config.local."""
    shutil.copytree(images, path / "images")
    git("init", "-q", cwd=path)
    server.client().create_bucket(Bucket=bucket)
    repo = Repo.init(str(path))
    with repo.config.edit() as conf:
        conf["core"]["remote"] = REMOTE
        conf["core"]["check_update"] = False
        conf["remote"][REMOTE] = {"url": f"s3://{bucket}/dvcstore", "endpointurl": server.endpoint_url}
    with repo.config.edit("local") as conf:
        conf["remote"][REMOTE] = {"access_key_id": server.access_key, "secret_access_key": server.secret_key}
    return repo


def assert_no_secret_committed(path: Path, server: SeaweedS3) -> None:
    committed = (path / ".dvc" / "config").read_text()
    assert server.endpoint_url in committed
    assert server.secret_key not in committed
    assert server.access_key not in committed
    assert server.secret_key in (path / ".dvc" / "config.local").read_text()
    git("check-ignore", "-q", ".dvc/config.local", cwd=path)


def test_boto3_round_trip_lists_1500_objects_over_several_pages(s3_server: SeaweedS3) -> None:
    client = s3_server.client()
    client.create_bucket(Bucket="roundtrip")
    objects = {f"objects/{i:05d}.bin": f"object {i};".encode() * (1 + i % 7) for i in range(1500)}
    with ThreadPoolExecutor(8) as pool:
        list(
            pool.map(lambda kv: client.put_object(Bucket="roundtrip", Key=kv[0], Body=kv[1]), objects.items())
        )

    pages = list(client.get_paginator("list_objects_v2").paginate(Bucket="roundtrip", Prefix="objects/"))
    listed = {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}
    assert len(pages) >= 2, "1,500 keys should take more than one page of at most 1,000"
    assert listed == {key: len(body) for key, body in objects.items()}

    def read(key: str) -> bytes:
        return client.get_object(Bucket="roundtrip", Key=key)["Body"].read()

    with ThreadPoolExecutor(8) as pool:
        assert dict(zip(objects, pool.map(read, objects), strict=True)) == objects


def test_dvc_push_then_pull_into_an_empty_workspace_and_cache(
    s3_server: SeaweedS3, fashion_pngs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "repo"
    path.mkdir()
    monkeypatch.chdir(path)  # DVC resolves targets and stage paths from the working directory
    with init_dvc_repo(path, fashion_pngs, s3_server, bucket="dvc-roundtrip") as repo:
        assert_no_secret_committed(path, s3_server)
        repo.add("images")
        assert repo.push() == N_IMAGES + 1  # the files and the directory's manifest
    stored = [
        o["Key"]
        for page in s3_server.client().get_paginator("list_objects_v2").paginate(Bucket="dvc-roundtrip")
        for o in page.get("Contents", [])
    ]
    assert len(stored) == N_IMAGES + 1
    assert all(key.startswith("dvcstore/files/md5/") for key in stored)

    shutil.rmtree(path / "images")
    shutil.rmtree(path / ".dvc" / "cache")
    with Repo(str(path)) as repo:
        assert len(repo.pull()["added"]) == 1
    assert folder_bytes(path / "images") == folder_bytes(fashion_pngs)


def test_push_fails_loudly_while_the_server_is_down_and_succeeds_after_restart(
    fashion_pngs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "repo"
    path.mkdir()
    monkeypatch.chdir(path)
    with (
        SeaweedS3(tmp_path / "seaweedfs") as server,
        init_dvc_repo(path, fashion_pngs, server, "dvc-outage") as repo,
    ):
        repo.add("images")
        git("add", "-A", cwd=path)
        git("commit", "-q", "-m", "Track images with DVC", cwd=path)
        assert ".dvc/config.local" not in git("ls-files", cwd=path).split()

        server.stop()
        # s3fs hands botocore's error through DVC unwrapped, after about 9 s of retries.
        with pytest.raises(
            EndpointConnectionError,
            match=re.escape(f'Could not connect to the endpoint URL: "{server.endpoint_url}/'),
        ):
            repo.push()

        server.start()
        assert repo.push() == N_IMAGES + 1
        assert repo.status(cloud=True) == {}

        # A fresh clone has no config.local: the credentials come from the environment.
        clone = tmp_path / "clone"
        git("clone", "-q", str(path), str(clone), cwd=tmp_path)
        assert not (clone / ".dvc" / "config.local").exists()
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        monkeypatch.chdir(clone)
        with Repo(str(clone)) as cloned:
            cloned.pull()
            assert cloned.status(cloud=True) == {}
        assert folder_bytes(clone / "images") == folder_bytes(fashion_pngs)
    left = subprocess.run(
        ["pgrep", "-af", f"weed .*mini .*{server.data_dir}"], capture_output=True, text=True
    )
    assert left.stdout == "", f"weed still running after stop(): {left.stdout}"
