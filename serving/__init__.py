"""FastAPI app: ad selection, OpenRTB adapter, outcomes, dashboard."""
