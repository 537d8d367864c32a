"""Ray Serve layer over rtedit: TextEncoder, Editor replicas and the FastAPI Router, composed in app.py."""
