import torch


def pytest_configure(config):
    # Side-by-side CPU timings on a shared 2-core machine: pin the thread count so runs compare.
    if not torch.cuda.is_available():
        torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Raw results carry what produced them: versions and the device."""
    from tenvoo_fast.ddpm.system import versions
    output_json["tenvoo_fast"] = {
        "versions": {**versions(), "cuda": torch.version.cuda},
        "device": (torch.cuda.get_device_name() if torch.cuda.is_available()
                   else f"cpu ({torch.get_num_threads()} threads)"),
    }
