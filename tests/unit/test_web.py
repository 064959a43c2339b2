"""Unit tests of `dataproc.web` with literals: the router, JSON responses, error shapes and
strict request bodies (the JSON loader itself is tested in test_strictjson.py). No sockets:
routing and body reading are data in, data out."""

from __future__ import annotations

import json
import logging

import pytest

from dataproc.errors import ApiError, Unauthorized, ValidationError, invalid, retry_later
from dataproc.strictjson import MAX_DEPTH
from dataproc.web import (
    Request,
    Response,
    Router,
    error_response,
    make_app,
    path_param,
    read_body,
)


def handler_named(name: str):
    def handler(request: Request) -> Response:
        return Response.json({"handler": name})

    handler.__name__ = name
    return handler


def request(
    method: str = "GET",
    path: str = "/",
    body: bytes = b"",
    content_type: str | None = None,
    **headers: list[str],
) -> Request:
    all_headers = {name.replace("_", "-"): values for name, values in headers.items()}
    if content_type is not None:
        all_headers["content-type"] = [content_type]
    return Request(method, path, {}, all_headers, body=body)


@pytest.fixture
def router() -> Router:
    router = Router()
    router.add("GET", "/api/data", handler_named("data"))
    router.add("POST", "/api/populate", handler_named("populate_post"))
    router.add("GET", "/api/populate", handler_named("populate_get"))
    router.add("POST", "/auth/login", handler_named("login"))
    return router


def status_of(call) -> ApiError:
    with pytest.raises(ApiError) as caught:
        call()
    return caught.value


# --- Router -------------------------------------------------------------------------------


def test_match_returns_the_handler_and_the_route_template(router):
    handler, route = router.match("POST", "/auth/login")
    assert handler.__name__ == "login" and route == "/auth/login"


def test_match_picks_the_handler_of_the_method(router):
    assert router.match("GET", "/api/populate")[0].__name__ == "populate_get"
    assert router.match("POST", "/api/populate")[0].__name__ == "populate_post"


def test_an_unknown_path_is_404(router):
    error = status_of(lambda: router.match("GET", "/api/nothing"))
    assert (error.status, error.detail, error.headers) == (404, "Not Found", {})


def test_paths_match_exactly_without_a_trailing_slash_or_case_folding(router):
    assert status_of(lambda: router.match("GET", "/api/data/")).status == 404
    assert status_of(lambda: router.match("GET", "/API/data")).status == 404


def test_a_wrong_method_is_405_with_allow_sorted(router):
    error = status_of(lambda: router.match("DELETE", "/api/populate"))
    assert (error.status, error.detail) == (405, "Method Not Allowed")
    assert error.headers == {"Allow": "GET, HEAD, POST"}


def test_a_post_only_path_allows_post_only(router):
    error = status_of(lambda: router.match("GET", "/auth/login"))
    assert error.headers == {"Allow": "POST"}


def test_head_is_served_by_the_get_handler(router):
    handler, route = router.match("HEAD", "/api/data")
    assert handler.__name__ == "data" and route == "/api/data"


def test_head_is_not_implied_by_post(router):
    assert status_of(lambda: router.match("HEAD", "/auth/login")).status == 405


def test_an_explicit_head_handler_is_not_replaced_by_a_later_get():
    router = Router()
    router.add("HEAD", "/x", handler_named("head"))
    router.add("GET", "/x", handler_named("get"))
    assert router.match("HEAD", "/x")[0].__name__ == "head"
    assert router.match("GET", "/x")[0].__name__ == "get"


def test_methods_are_case_sensitive(router):
    assert status_of(lambda: router.match("get", "/api/data")).status == 405


def templated_router() -> Router:
    router = Router()
    router.add("GET", "/api/users", handler_named("list"))
    router.add("PATCH", "/api/users/{username}", handler_named("patch"))
    router.add("DELETE", "/api/users/{username}", handler_named("delete"))
    router.add("GET", "/api/users/me", handler_named("me"))  # a static path wins
    return router


def test_a_path_parameter_matches_one_segment_and_reports_the_template():
    router = templated_router()
    handler, route = router.match("PATCH", "/api/users/alice")
    assert (handler.__name__, route) == ("patch", "/api/users/{username}")
    assert router.match("DELETE", "/api/users/a@b.c")[0].__name__ == "delete"
    assert router.match("GET", "/api/users/me")[0].__name__ == "me"
    assert router.match("GET", "/api/users")[0].__name__ == "list"


def test_a_path_parameter_never_matches_an_empty_or_extra_segment():
    router = templated_router()
    for path in ("/api/users/", "/api/users/alice/x", "/api/users//"):
        assert status_of(lambda path=path: router.match("PATCH", path)).status == 404


def test_a_templated_path_answers_405_with_its_methods():
    error = status_of(lambda: templated_router().match("GET", "/api/users/alice"))
    assert error.status == 405 and error.headers["Allow"] == "DELETE, PATCH"


def test_path_param_reads_the_value_from_the_matched_template():
    router = templated_router()
    request = Request("PATCH", "/api/users/ann@example.org", {}, {})
    request.route = router.match(request.method, request.path)[1]
    assert path_param(request, "username") == "ann@example.org"
    with pytest.raises(KeyError):
        path_param(request, "other")


def test_routes_lists_each_path_with_its_methods_and_head_left_implicit(router):
    assert router.routes() == {
        "/api/data": ("GET",),
        "/api/populate": ("POST", "GET"),
        "/auth/login": ("POST",),
    }


# --- make_app -----------------------------------------------------------------------------


def test_the_app_sets_the_route_and_calls_the_handler(router):
    req = request("GET", "/api/data")
    response = make_app(router)(req)
    assert json.loads(response.body) == {"handler": "data"} and req.route == "/api/data"


def test_the_app_turns_a_routing_error_into_json(router):
    response = make_app(router)(request("PUT", "/api/data"))
    assert response.status == 405 and response.body == b'{"detail":"Method Not Allowed"}'
    assert response.headers["Allow"] == "GET, HEAD"


def test_the_app_turns_an_unexpected_exception_into_a_fixed_500_and_logs_it(caplog):
    router = Router()

    def broken(req: Request) -> Response:
        raise ZeroDivisionError("secret detail")

    router.add("GET", "/broken", broken)
    response = make_app(router)(request("GET", "/broken"))
    assert response.status == 500 and response.body == b'{"detail":"Internal Server Error"}'
    assert b"secret" not in response.body
    logged = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert logged and logged[0].exc_info[0] is ZeroDivisionError


# --- Response -----------------------------------------------------------------------------


def test_response_json_is_compact_utf8_with_the_json_content_type():
    response = Response.json({"a": 1, "b": [1, 2], "name": "Zo\u00eb"}, 201, {"X-A": "1"})
    assert response.status == 201
    assert response.body == '{"a":1,"b":[1,2],"name":"Zo\u00eb"}'.encode()
    assert response.headers == {"Content-Type": "application/json", "X-A": "1"}


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_response_json_refuses_non_finite_numbers(value):
    with pytest.raises(ValueError):
        Response.json({"value": value})


def test_response_raw_json_passes_bytes_through():
    response = Response.raw_json(b'[{"id":1}]', headers={"Link": "<x>"})
    assert response.body == b'[{"id":1}]' and response.status == 200
    assert response.headers == {"Content-Type": "application/json", "Link": "<x>"}


# --- error shapes -------------------------------------------------------------------------


def test_response_streamed_carries_the_chunks_the_type_and_no_body():
    response = Response.streamed([b"a", b"b"], "text/csv", {"X-A": "1"}, status=206)
    assert (response.status, response.body) == (206, b"")
    assert response.headers == {"Content-Type": "text/csv", "X-A": "1"}
    assert response.stream is not None and list(response.stream) == [b"a", b"b"]


def test_a_streamed_response_with_body_bytes_is_refused():
    with pytest.raises(ValueError):
        Response(200, b"x", stream=iter([b"y"]))


def test_not_modified_is_a_bodiless_304_with_the_etag_and_the_given_headers():
    response = Response.not_modified('"v1"', {"Cache-Control": "private, no-cache", "Vary": "A"})
    assert (response.status, response.body, response.stream) == (304, b"", None)
    assert response.headers == {"Cache-Control": "private, no-cache", "Vary": "A", "ETag": '"v1"'}


def test_an_error_with_a_message_is_a_detail_string():
    response = error_response(ApiError(409, "username already taken"))
    assert (response.status, response.body) == (409, b'{"detail":"username already taken"}')
    assert response.close is False


def test_a_validation_error_is_a_detail_list_naming_the_field():
    response = error_response(invalid("query", "limit", "must be at most 1000", "less_than_equal"))
    assert response.status == 422
    assert json.loads(response.body) == {
        "detail": [
            {"loc": ["query", "limit"], "msg": "must be at most 1000", "type": "less_than_equal"}
        ]
    }


def test_a_validation_error_can_name_several_fields():
    problems = [
        {"loc": ["query", "skip"], "msg": "a", "type": "t"},
        {"loc": ["query", "limit"], "msg": "b", "type": "t"},
    ]
    assert json.loads(error_response(ValidationError(problems)).body)["detail"] == problems


def test_an_unauthorized_error_carries_the_bearer_challenge():
    missing = error_response(Unauthorized("Not authenticated", token_sent=False))
    rejected = error_response(Unauthorized("Could not validate credentials", token_sent=True))
    assert missing.status == rejected.status == 401
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    assert rejected.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'


@pytest.mark.parametrize(
    "seconds, header", [(0, "1"), (0.2, "1"), (1.0, "1"), (1.01, "2"), (59.5, "60")]
)
def test_retry_after_is_whole_seconds_rounded_up_and_at_least_one(seconds, header):
    response = error_response(retry_later(429, "too many attempts", seconds))
    assert response.status == 429 and response.headers["Retry-After"] == header


def test_an_error_that_must_close_the_connection_says_so():
    assert error_response(ApiError(413, "too big", close=True)).close is True


# --- Request.header -----------------------------------------------------------------------


def test_a_header_given_once_is_read():
    assert request(authorization=["Bearer x"]).header("authorization") == "Bearer x"


def test_a_missing_header_is_none():
    assert request().header("authorization") is None


def test_a_duplicated_header_is_a_400():
    req = request(authorization=["Bearer a", "Bearer b"])
    error = status_of(lambda: req.header("authorization"))
    assert (error.status, error.detail) == (400, "duplicate authorization header")


# --- read_body ----------------------------------------------------------------------------


def body_error(req: Request, max_fields: int = 8) -> ApiError:
    return status_of(lambda: read_body(req, max_fields=max_fields))


def only_problem(error: ApiError) -> dict:
    assert error.status == 422 and len(error.detail) == 1
    return error.detail[0]


def test_a_json_object_body_is_read():
    req = request(
        "POST",
        body=b'{"username": "alice", "password": "p", "n": [1, 2.5]}',
        content_type="application/json",
    )
    assert read_body(req, max_fields=8) == {"username": "alice", "password": "p", "n": [1, 2.5]}


@pytest.mark.parametrize(
    "content_type",
    ["application/json; charset=utf-8", "Application/JSON", "application/merge-patch+json"],
)
def test_json_media_types_with_parameters_or_suffixes_are_read(content_type):
    req = request("POST", body=b'{"a": 1}', content_type=content_type)
    assert read_body(req, max_fields=8) == {"a": 1}


def test_a_form_body_is_read_as_strings():
    req = request(
        "POST",
        body=b"username=al%20ice&password=p%26w+d&empty=",
        content_type="application/x-www-form-urlencoded",
    )
    assert read_body(req, max_fields=8) == {"username": "al ice", "password": "p&w d", "empty": ""}


def test_an_empty_body_without_a_content_type_is_an_empty_dict():
    assert read_body(request("POST"), max_fields=8) == {}


def test_an_empty_form_body_is_an_empty_dict():
    req = request("POST", content_type="application/x-www-form-urlencoded")
    assert read_body(req, max_fields=8) == {}


@pytest.mark.parametrize("content_type", ["text/plain", "multipart/form-data; boundary=x", None])
def test_another_content_type_is_415(content_type):
    error = body_error(request("POST", body=b"a=1", content_type=content_type))
    assert error.status == 415 and "application/json" in error.detail


def test_a_duplicated_content_type_header_is_400():
    req = request("POST", body=b"{}", content_type="application/json")
    req.headers["content-type"].append("text/plain")
    assert body_error(req).status == 400


@pytest.mark.parametrize(
    "body",
    [b"{", b"", b"{'a': 1}", b'{"a": 1} x', b'{"a": 01}'],
    ids=["truncated", "empty", "single-quotes", "trailing", "leading-zero"],
)
def test_invalid_json_is_422_located_at_the_body(body):
    problem = only_problem(body_error(request("POST", body=body, content_type="application/json")))
    assert problem["loc"] == ["body", "body"] and problem["type"] == "json_invalid"
    assert problem["msg"].startswith("invalid JSON")


@pytest.mark.parametrize("body", [b"[1, 2]", b'"text"', b"null", b"3"])
def test_a_json_body_that_is_not_an_object_is_422(body):
    problem = only_problem(body_error(request("POST", body=body, content_type="application/json")))
    assert problem["loc"] == ["body", "body"] and problem["type"] == "model_attributes_type"


def test_a_json_body_with_a_duplicate_key_is_422():
    req = request(
        "POST", body=b'{"role": "user", "role": "admin"}', content_type="application/json"
    )
    problem = only_problem(body_error(req))
    assert "duplicate key" in problem["msg"]


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
def test_a_json_body_with_a_non_finite_number_is_422(constant):
    req = request("POST", body=b'{"a": ' + constant + b"}", content_type="application/json")
    assert "is not valid JSON" in only_problem(body_error(req))["msg"]


def test_a_json_body_nested_too_deeply_is_422():
    body = b'{"a": ' + b"[" * MAX_DEPTH + b"]" * MAX_DEPTH + b"}"
    problem = only_problem(body_error(request("POST", body=body, content_type="application/json")))
    assert "nested too deeply" in problem["msg"]


def test_a_json_body_with_a_lone_surrogate_is_422_saying_where():
    req = request("POST", body=b'{"name": "\\ud800"}', content_type="application/json")
    problem = only_problem(body_error(req))
    assert problem["loc"] == ["body", "body"] and problem["type"] == "json_invalid"
    assert problem["msg"] == "invalid JSON: text contains an unpaired surrogate at '/name'"


def test_invalid_utf8_in_a_json_body_is_422():
    req = request("POST", body=b'{"name": "\xff"}', content_type="application/json")
    assert only_problem(body_error(req))["loc"] == ["body", "body"]


def test_a_form_field_given_twice_is_422_naming_the_field():
    req = request(
        "POST", body=b"username=a&username=b", content_type="application/x-www-form-urlencoded"
    )
    assert only_problem(body_error(req))["loc"] == ["body", "username"]


@pytest.mark.parametrize(
    "body",
    [b"username=%FF", b"a=1&&b=2", b"novalue"],
    ids=["invalid-utf8", "empty-pair", "no-equals"],
)
def test_a_malformed_form_body_is_422(body):
    req = request("POST", body=body, content_type="application/x-www-form-urlencoded")
    assert only_problem(body_error(req))["loc"] == ["body", "body"]


def test_a_form_with_too_many_fields_is_422():
    req = request("POST", body=b"a=1&b=2&c=3", content_type="application/x-www-form-urlencoded")
    assert only_problem(body_error(req, max_fields=2))["loc"] == ["body", "body"]
