package batch

import (
	"bufio"
	"io"
	"net/http"
	"slices"
	"strings"
	"testing"
)

// With Accept: application/x-ndjson each result is on the wire, one line
// with its index, the moment it is final: before the next operation ends.
func TestNDJSONStreaming(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, proxySite(be, ""))
	req, _ := http.NewRequest(http.MethodPost, base+"/batch", strings.NewReader(
		`[{"id":"fast","path":"/echo"},{"id":"slow","path":"/slow?id=s&d=1s"}]`))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/x-ndjson")
	resp, err := client.Do(req)
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
