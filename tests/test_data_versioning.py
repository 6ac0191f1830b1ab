"""`ssl-pipeline data`: ingest, DVC versions, push and pull, on a local remote and on real S3."""

import shutil
import subprocess
from pathlib import Path

import dvc.repo  # noqa: F401  DVC binds its log handlers to the streams of the moment it is imported
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from flows.cli import app
from ssl_models.data import read_idx

pytestmark = [
    pytest.mark.usefixtures("isolated_dvc"),
    pytest.mark.filterwarnings("ignore:_NoneStep.value:DeprecationWarning"),
]


def git(*args: str, cwd: Path) -> str:
    identity = ["-c", "user.name=ssl-pipeline tests", "-c", "user.email=tests@localhost"]
    out = subprocess.run(["git", *identity, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def fashion_pngs(fashion_mnist_dir: Path, folder: Path, start: int, stop: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, pixels in enumerate(read_idx(fashion_mnist_dir / "t10k-images-idx3-ubyte.gz")[start:stop], start):
        Image.fromarray(pixels).save(folder / f"{i:05d}.png")


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    git("init", "-q", cwd=root)
    (root / ".gitignore").write_text("workspace/\n")
    return root


def test_ingest_version_push_and_pull_with_a_local_remote(
    repo: Path, fashion_mnist_dir: Path, tmp_path: Path
) -> None:
    root = str(repo)
    assert cli("data", "init", "--root", root, "--remote", str(tmp_path / "remote"))[0] == 0
    fashion_pngs(fashion_mnist_dir, tmp_path / "first", 0, 40)
    (tmp_path / "first" / "truncated.png").write_bytes((tmp_path / "first" / "00000.png").read_bytes()[:60])
    code, out = cli("data", "ingest", str(tmp_path / "first"), "--root", root)
    assert code == 0, out
    assert "40 added" in out and "1 quarantined" in out and "truncated.png" in out
    # One shard, the manifest, the ingest's record, dataset.json, and DVC's directory listing.
    assert "pushed 5 files" in out
    assert len([p for p in (tmp_path / "remote").rglob("*") if p.is_file()]) == 5
    git("add", "-A", cwd=repo)
    git("commit", "-qm", "first version", cwd=repo)
    first = tree(repo / "data" / "unlabeled")

    fashion_pngs(fashion_mnist_dir, tmp_path / "second", 30, 50)  # 10 already in, 10 new
    code, out = cli("data", "ingest", str(tmp_path / "second"), "--root", root)
    assert code == 0, out
    assert "10 added, 10 already present" in out
    assert "pushed 4 files" in out  # only what is new: a shard, a manifest part, a record, the listing
    git("add", "-A", cwd=repo)
    git("commit", "-qm", "second version", cwd=repo)

    code, out = cli("data", "versions", "data/unlabeled", "--root", root)
    lines = out.strip().splitlines()
    assert code == 0 and len(lines) == 2 and "7 files" in lines[0] and "4 files" in lines[1]
    code, out = cli("data", "status", "data/unlabeled", "--root", root)
    assert code == 0 and "up to date" in out, out

    second = tree(repo / "data" / "unlabeled")
    shutil.rmtree(repo / "data" / "unlabeled")
    shutil.rmtree(repo / ".dvc" / "cache")
    assert cli("data", "pull", "data/unlabeled", "--root", root)[0] == 0
    assert tree(repo / "data" / "unlabeled") == second
    git("checkout", "-q", "HEAD~1", "--", "data/unlabeled.dvc", cwd=repo)
    assert cli("data", "pull", "data/unlabeled", "--root", root)[0] == 0
    assert tree(repo / "data" / "unlabeled") == first


def test_a_bad_labels_file_fails_naming_it_and_keeps_the_stored_version(
    repo: Path, fashion_mnist_dir: Path, tmp_path: Path
) -> None:
    root = str(repo)
    cli("data", "init", "--root", root, "--remote", str(tmp_path / "remote"))
    fashion_pngs(fashion_mnist_dir, tmp_path / "src" / "Coat", 0, 5)
    assert cli("data", "ingest", str(tmp_path / "src"), "--kind", "labeled", "--root", root)[0] == 0
    before = tree(repo / "data"), (repo / "data" / "labeled.dvc").read_text()

    images, labels = tmp_path / "images-idx3-ubyte", tmp_path / "labels-idx1-ubyte"
    pixels = np.zeros((3, 28, 28), np.uint8)
    images.write_bytes(
        bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in pixels.shape) + pixels.tobytes()
    )
    labels.write_bytes(b"not an idx file")
    code, out = cli(
        "data", "ingest", str(images), "--labels", str(labels), "--kind", "labeled", "--root", root
    )
    assert code == 1
    assert f"{labels}: not an IDX file" in " ".join(out.split())
    assert (tree(repo / "data"), (repo / "data" / "labeled.dvc").read_text()) == before


@pytest.mark.slow
def test_ingest_from_an_s3_prefix_into_an_s3_remote(
    repo: Path, fashion_mnist_dir: Path, tmp_path: Path, s3_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    s3 = s3_server.client()
    s3.create_bucket(Bucket="raw-images")
    s3.create_bucket(Bucket="dvc-store")
    fashion_pngs(fashion_mnist_dir, tmp_path / "src", 0, 30)
    for path in sorted((tmp_path / "src").iterdir()):
        s3.put_object(Bucket="raw-images", Key=f"batch-1/{path.name}", Body=path.read_bytes())
    s3.put_object(Bucket="raw-images", Key="batch-1/corrupt.jpg", Body=b"\xff\xd8\xff\xe0 truncated")
    root = str(repo)
    code, out = cli(
        "data",
        "init",
        "--root",
        root,
        "--remote",
        "s3://dvc-store/ssl",
        "--endpoint-url",
        s3_server.endpoint_url,
    )
    assert code == 0, out
    assert s3_server.secret_key not in (repo / ".dvc" / "config").read_text()

    code, out = cli("data", "ingest", "s3://raw-images/batch-1", "--root", root)
    assert code == 0, out
    assert "30 added" in out and "1 quarantined" in out and "s3://raw-images/batch-1/corrupt.jpg" in out
    assert "pushed 5 files" in out
    stored = tree(repo / "data" / "unlabeled")
    shutil.rmtree(repo / "data" / "unlabeled")
    shutil.rmtree(repo / ".dvc" / "cache")
    assert cli("data", "pull", "data/unlabeled", "--root", root)[0] == 0
    assert tree(repo / "data" / "unlabeled") == stored
    code, out = cli("data", "status", "data/unlabeled", "--root", root)
    assert code == 0 and "up to date" in out, out


@pytest.mark.slow
def test_push_during_an_s3_outage_fails_naming_the_remote_and_loses_nothing(
    repo: Path, fashion_mnist_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.s3_server import SeaweedS3

    with SeaweedS3(tmp_path / "seaweedfs") as server:
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        server.client().create_bucket(Bucket="outage")
        root = str(repo)
        cli(
            "data",
            "init",
            "--root",
            root,
            "--remote",
            "s3://outage/ssl",
            "--endpoint-url",
            server.endpoint_url,
        )
        fashion_pngs(fashion_mnist_dir, tmp_path / "src", 0, 25)
        code, out = cli("data", "ingest", str(tmp_path / "src"), "--no-push", "--root", root)
        assert code == 0, out
        stored = tree(repo / "data" / "unlabeled")

        server.stop()
        code, out = cli("data", "push", "data/unlabeled", "--root", root)
        assert code == 1
        assert "push to remote 'storage' (s3://outage/ssl) failed" in out
        assert "Could not connect to the endpoint URL" in out

        server.start()
        code, out = cli("data", "status", "data/unlabeled", "--root", root)
        assert code == 0 and "remote: " in out  # the remote still lacks the version
        code, out = cli("data", "push", "data/unlabeled", "--root", root)
        assert code == 0 and "pushed 5 files" in out, out
        code, out = cli("data", "status", "data/unlabeled", "--root", root)
        assert code == 0 and "up to date" in out, out

        shutil.rmtree(repo / "data" / "unlabeled")
        shutil.rmtree(repo / ".dvc" / "cache")
        assert cli("data", "pull", "data/unlabeled", "--root", root)[0] == 0
        assert tree(repo / "data" / "unlabeled") == stored
