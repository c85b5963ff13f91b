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


def _outage_app():
    import psycopg
    from sqlalchemy import exc

    from fcp_server.storage.blobs import BlobBackendError

    app = _app()

    @app.get("/db-down")
    def db_down():
        raise exc.OperationalError("SELECT 1", {}, psycopg.OperationalError("connection lost"))

    @app.get("/blobs-down")
    def blobs_down():
        raise BlobBackendError("GCS could not write blob 'x': timed out")

    return app


def test_unavailable_dependencies_answer_503_with_retry_after_not_500():
    client = _outage_app().test_client()
    for path, dependency in (("/db-down", "database"), ("/blobs-down", "blob store")):
        resp = client.get(path)
        assert resp.status_code == 503
        assert resp.headers["Retry-After"] == str(errors.DEPENDENCY_RETRY_AFTER_SECONDS)
        error = resp.get_json()["error"]
        assert error["status"] == "UNAVAILABLE"
        assert (
            error["message"]
            == f"the {dependency} is temporarily unavailable; retry the request later"
        )
        assert "connection lost" not in resp.get_data(as_text=True)  # no internals leak
