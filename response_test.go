package batch

import (
	"bufio"
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/tidwall/gjson"
)

// An answer nested deeper than the JSON check may go goes into the batch as
// text. A client can have an API store any blob and read it back in the
// same batch; checked recursively, 9.5 MB of '[' overflow the stack, and a
// stack overflow kills the whole process.
func TestDeepAnswerEmbeddedAsText(t *testing.T) {
	nested := func(n int) []byte { return []byte(strings.Repeat("[", n) + strings.Repeat("]", n)) }
	blob := bytes.Repeat([]byte("["), 9_500_000)
	base := startCaddy(t, rawSite(t, "", map[string]func(http.ResponseWriter){
		"/blob":        jsonAnswer(blob),
		"/too-deep":    jsonAnswer(nested(maxAnswerDepth + 1)),
		"/deep-enough": jsonAnswer(nested(maxAnswerDepth)),
	}))
	status, _, body := send(t, "POST", base+"/batch", `[{"id":"blob","path":"/blob"},{"path":"/too-deep"},{"path":"/deep-enough"},
		{"path":"/x/{{blob.body.a}}"}]`)
	if status != 200 {
		t.Fatalf("status %d: %.300s", status, body)
	}
	res := mustJSON(t, body)
	if got := res.Get("0.body"); got.Type != gjson.String || got.Str != string(blob) {
		t.Errorf("the blob is not its text: %.100s", got.Raw)
	}
	if got := res.Get("1.body"); got.Type != gjson.String || got.Str != string(nested(maxAnswerDepth+1)) {
		t.Errorf("too deep: %.100s", got.Raw)
	}
	if got := res.Get("2.body"); !got.IsArray() {
		t.Errorf("%d levels are embedded as JSON: %.100s", maxAnswerDepth, got.Raw)
	}
	if r := res.Get("3"); r.Get("status").Int() != 424 || !strings.Contains(r.Get("error").String(), "did not answer JSON") {
		t.Errorf("a reference into the blob: %s", r.Raw)
	}
}

// An answer labelled JSON but not in UTF-8 is embedded as base64: the
// batch answer is valid UTF-8 JSON in every form, or strict clients read
// nothing of it.
func TestInvalidUTF8AnswerIsBase64(t *testing.T) {
	bad := []byte("{\"name\":\"caf\xe9\"}") // Latin-1, labelled JSON
	answers := map[string]func(http.ResponseWriter){
		"/latin1": jsonAnswer(bad),
		"/header": func(w http.ResponseWriter) {
			w.Header().Set("X-Name", "caf\xe9")
			jsonAnswer([]byte(`{"ok":true}`))(w)
		},
	}
	base := startCaddy(t, rawSite(t, `{
		async {
			retention 1h
		}
	}`, answers))
	const ops = `[{"path":"/latin1"},{"path":"/header"}]`
	check := func(form, answer string, result gjson.Result) {
		t.Helper()
		if !utf8.ValidString(answer) || !json.Valid([]byte(answer)) && form != "ndjson" {
			t.Errorf("%s: the answer is not valid UTF-8 JSON: %q", form, answer)
		}
		if result.Get("body_encoding").String() != "base64" || result.Get("body").String() != b64(bad) {
			t.Errorf("%s: %s", form, result.Raw)
		}
	}
	_, _, body := send(t, "POST", base+"/batch", ops)
	check("sync", body, mustJSON(t, body).Get("0"))
	if v := mustJSON(t, body).Get("1.headers.X-Name").String(); v != "caf\ufffd" {
		t.Errorf("header value %q", v)
	}

	_, _, body = send(t, "POST", base+"/batch", ops, "Accept: application/x-ndjson")
	lines := strings.Split(strings.TrimSpace(body), "\n")
	for _, l := range lines {
		if !json.Valid([]byte(l)) || !utf8.ValidString(l) {
			t.Errorf("ndjson line is not valid UTF-8 JSON: %q", l)
		}
	}
	check("ndjson", body, gjson.Parse(lines[0]))

	status, hdr, body := send(t, "POST", base+"/batch", ops, alice, "Prefer: respond-async")
	if status != 202 {
		t.Fatalf("async submit: %d %s", status, body)
	}
	waitJob(t, base+hdr.Get("Location"), alice, "completed")
	_, _, body = send(t, "GET", base+hdr.Get("Location")+"/results", "", alice)
	check("async", body, mustJSON(t, body).Get("results.0"))
}

// An answer goes into the batch answer by what it is: text as a string,
// bytes that are not UTF-8 as base64, JSON as JSON unless it is not
// valid; "error" is only for statuses the batch layer gives.
func TestResultBodies(t *testing.T) {
	t.Parallel()
	b := ptParse(t, ptLimits(t, nil), `[{"path":"/text"},{"path":"/binary"},{"path":"/badjson"},{"path":"/health"}]`)
	// As the backend answers those paths, captured as attempt does.
	answers := []struct {
		ctype string
		body  string
	}{
		{"text/plain; charset=utf-8", "hello \"batch\"\n"},
		{"application/octet-stream", "\xff\x00\xfe\x01"},
		{"application/json", `{"broken":`},
		{"application/json", `{"status":"ok"}` + "\n"},
	}
	w := httptest.NewRecorder()
	out := native.sink(w, httptest.NewRequest(http.MethodPost, "/batch", nil), b)
	for i, a := range answers {
		header := http.Header{"Content-Type": {a.ctype}}
		out.put(i, b.ops[i], &result{status: 200, header: header, body: []byte(a.body), isJSON: jsonBody(header, []byte(a.body))})
	}
	out.close(summary{status: statusCompleted, total: len(answers), succeeded: len(answers)})
	res := mustJSON(t, w.Body.String()).Array()
	if got := res[0].Get("body"); got.Type != gjson.String || got.String() != "hello \"batch\"\n" {
		t.Errorf("text body: %s", res[0].Raw)
	}
	if res[1].Get("body").String() != b64([]byte{0xff, 0, 0xfe, 1}) || res[1].Get("body_encoding").String() != "base64" {
		t.Errorf("binary body: %s", res[1].Raw)
	}
	if got := res[2].Get("body"); got.Type != gjson.String || got.String() != `{"broken":` {
		t.Errorf("invalid JSON must come back as text: %s", res[2].Raw)
	}
	if res[3].Get("body.status").String() != "ok" {
		t.Errorf("JSON body: %s", res[3].Raw)
	}
	if res[0].Get("error").Exists() {
		t.Errorf("error is only for batch-layer statuses: %s", res[0].Raw)
	}
}

// With Accept: application/x-ndjson each result is on the wire, one line
// with its index, the moment it is final: before the next operation ends.
func TestNDJSONStreaming(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, proxySite(be, ""))
	resp, err := client.Do(request(t, "POST", base+"/batch", `[{"id":"fast","path":"/echo"},{"id":"slow","path":"/slow?id=s&d=1s"}]`,
		"Accept: application/x-ndjson"))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if ct := resp.Header.Get("Content-Type"); ct != "application/x-ndjson" {
		t.Errorf("Content-Type %q", ct)
	}
	lines := bufio.NewReader(resp.Body)
	first, err := lines.ReadString('\n')
	if err != nil {
		t.Fatal(err)
	}
	if ev := be.eventLog(); slices.Contains(ev, "end s") {
		t.Errorf("the first result came only after the last operation ended: %v", ev)
	}
	r := mustJSON(t, first)
	if r.Get("index").Int() != 0 || r.Get("id").String() != "fast" || r.Get("status").Int() != 200 || !r.Get("body.headers").IsObject() {
		t.Errorf("first line: %s", first)
	}
	rest, _ := io.ReadAll(lines)
	out := strings.Split(strings.TrimSpace(string(rest)), "\n")
	if len(out) != 2 || mustJSON(t, out[0]).Get("index").Int() != 1 || mustJSON(t, out[1]).Get("summary").Bool() != true ||
		mustJSON(t, out[1]).Get("succeeded").Int() != 2 {
		t.Errorf("rest of the stream: %q", rest)
	}
}
