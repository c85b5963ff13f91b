from flask import Flask

from fcp_server import errors


def _app():
    app = Flask(__name__)
    errors.register_error_handlers(app)

    @app.get("/conflict")
    def conflict():
        raise errors.AlreadyExists("taken")

    @app.get("/boom")
    def boom():
        raise RuntimeError("secret internals")

    return app


def test_fcp_errors_render_the_json_error_document():
    resp = _app().test_client().get("/conflict")
    assert resp.status_code == 409
    assert resp.get_json() == {
        "error": {"code": 409, "status": "ALREADY_EXISTS", "message": "taken"}
    }


def test_unknown_routes_and_unexpected_errors_are_json_too():
    client = _app().test_client()
    missing = client.get("/nope")
    assert missing.status_code == 404 and missing.get_json()["error"]["code"] == 404
    boom = client.get("/boom")
    assert boom.status_code == 500
    assert "secret" not in boom.get_data(as_text=True)
