"""The hub helpers (test_time_registers.hub)."""


def test_the_hub_is_not_probed_behind_a_proxy(monkeypatch):
    from huggingface_hub import constants

    from test_time_registers import hub

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for name in hub.PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert "127.0.0.1 cannot be reached" in hub.why_offline("http://127.0.0.1:9")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert hub.why_offline("http://127.0.0.1:9") is None
