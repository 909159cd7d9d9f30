"""Metrics summed over the workers' files (prometheus-client's multiprocess mode)."""

from prometheus_client.mmap_dict import MmapedDict, mmap_key

from inference.metrics import MULTIPROCESS_DIR, ServiceMetrics


def test_a_worker_file_not_yet_sized_is_skipped_not_fatal(tmp_path, monkeypatch):
    monkeypatch.setenv(MULTIPROCESS_DIR, str(tmp_path))
    (tmp_path / "counter_2.db").touch()  # a worker starting: its file exists, still 0 bytes
    metrics = ServiceMetrics()  # registering reads no file
    worker = MmapedDict(str(tmp_path / "counter_1.db"))
    worker.write_value(mmap_key("recstack_shed_requests_total", "recstack_shed_requests_total", ["reason"],
                                ["queue_full"], "recstack_shed_requests"), 3.0, 0.0)
    worker.close()
    text = metrics.exposition().decode()
    assert 'recstack_shed_requests_total{reason="queue_full"} 3.0' in text
