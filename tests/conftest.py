"""Shared fixtures: an isolated image cache, the optional real CelebA sample, tiny trained endpoints."""

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CELEBA_SAMPLE = SHARED_DATA / "celeba-sample"

# Small enough to train in a second or two on a 2-core CPU, big enough to show a loss barrier.
TINY = ["--dataset", "synthetic", "--image-size", "32", "--limit", "384", "--width", "8", "--latent-dim", "16",
        "--batch-size", "32", "--lr", "3e-3", "--no-progress"]


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Never touch the user's ~/.cache/aecurves from tests."""
    old = os.environ.get("AECURVES_CACHE")
    os.environ["AECURVES_CACHE"] = str(tmp_path_factory.mktemp("aecurves-cache"))
    yield
    if old is None:
        os.environ.pop("AECURVES_CACHE", None)
    else:
        os.environ["AECURVES_CACHE"] = old


@pytest.fixture
def celeba_sample() -> Path:
    if not (CELEBA_SAMPLE / "img_align_celeba").is_dir():
        pytest.skip(f"the real CelebA sample is not here ({CELEBA_SAMPLE}); it ships only beside the project repo")
    return CELEBA_SAMPLE


def train_briefly(data, seed: int, arch: dict, steps: int = 40):
    """A ConvAutoencoder(**arch) trained for `steps` Adam steps from its own seed (independent of any other), its
    BatchNorm running statistics then settled at the final weights, as after a long run at a low lr."""
    import torch

    from aecurves.data import BatchLoader
    from aecurves.models import ConvAutoencoder

    torch.manual_seed(seed)
    model = ConvAutoencoder(**arch)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loader = BatchLoader(data.train, 32, "cpu", shuffle=True, seed=seed)
    step, epoch = 0, 0
    while step < steps:
        epoch += 1
        loader.set_epoch(epoch)
        for x in loader:
            loss = torch.nn.functional.mse_loss(model(x), x)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step >= steps:
                break
    with torch.no_grad():
        for x in loader:
            model(x)
    return model.train()


def run_cli(*argv) -> int:
    from aecurves.cli import main

    return main([str(a) for a in argv])


@pytest.fixture(scope="session")
def tiny_endpoints(tmp_path_factory) -> tuple[Path, Path]:
    """Two endpoint checkpoints trained from seeds 1 and 2 through the CLI (fp32, 6 epochs)."""
    root = tmp_path_factory.mktemp("endpoints")
    paths = []
    for seed in (1, 2):
        out = root / f"seed{seed}"
        assert run_cli("train", *TINY, "--epochs", 6, "--seed", seed, "--precision", "fp32", "--out", out) == 0
        paths.append(out / "checkpoint.pt")
    return paths[0], paths[1]


CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


def browser_missing() -> str | None:
    """Why the browser tests cannot run here (None: they can): Debian's chromium, chromium-driver, and selenium."""
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not path.is_file():
            return f"no {path} (Debian's {package}: apt-get install chromium chromium-driver; .ci/run does as root)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    return None


def start_chromium(javascript: bool = True):
    """Headless Chromium at 1400x1000 through the system chromedriver, its console kept for get_log("browser").
    Nothing reaches the network: updates and sync are off, and with the driver's path given selenium never runs
    Selenium Manager (which would download one)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-default-apps", "--disable-extensions", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    if not javascript:
        options.add_experimental_option("prefs", {"profile.managed_default_content_settings.javascript": 2})
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


@pytest.fixture(scope="session")
def browser():
    """One headless Chromium for the session (tests/test_browser.py); skips, saying why, where none is installed."""
    reason = browser_missing()
    if reason:
        pytest.skip(reason)
    driver = start_chromium()
    yield driver
    driver.quit()


def pytest_collection_modifyitems(config, items):
    """Tests marked cuda run only where torch sees a GPU; elsewhere they skip, saying so."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none here); benchmarks/gpu_check.sh runs these on a lent one")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
