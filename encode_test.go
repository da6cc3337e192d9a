package batch

import (
	"bufio"
	"compress/gzip"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"
)

// The batch answer honours Accept-Encoding itself, with Caddy's own
// encoders: the site's encode directive cannot reach it (batch is ordered
// first, and operations never inherit Accept-Encoding).
func TestBatchAnswerCompressed(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, proxySite(be, "")+"\n\tencode zstd gzip")
	ops := make([]string, 100)
	for i := range ops {
		ops[i] = `{"path":"/users"}`
	}
	batch := "[" + strings.Join(ops, ",") + "]"
	fetch := func(ae string) (*http.Response, []byte) {
		t.Helper()
		resp, err := client.Do(request(t, "POST", base+"/batch", batch, "Accept-Encoding: "+ae))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		raw, _ := io.ReadAll(resp.Body)
		return resp, raw
	}
	plainResp, plain := fetch("identity")
	if plainResp.Header.Get("Content-Encoding") != "" || !strings.HasPrefix(string(plain), `[{"id":"0","status":200`) {
		t.Fatalf("identity: %v %.80s", plainResp.Header, plain)
	}
	sizes := map[string]int{"identity": len(plain)}
	for _, enc := range []string{"gzip", "zstd", "gzip, zstd;q=0.5"} {
		resp, raw := fetch(enc)
		var r io.Reader
		switch got := resp.Header.Get("Content-Encoding"); got {
		case "gzip":
			gz, err := gzip.NewReader(strings.NewReader(string(raw)))
			if err != nil {
				t.Fatal(err)
			}
			r = gz
		case "zstd":
			zr, err := zstd.NewReader(strings.NewReader(string(raw)))
			if err != nil {
				t.Fatal(err)
			}
			defer zr.Close()
			r = zr
		default:
			t.Fatalf("%s: Content-Encoding %q", enc, got)
		}
		decoded, err := io.ReadAll(r)
		if err != nil {
			t.Fatal(err)
		}
		// Dates may tick between two answers: compare what else they say.
		if len(decoded) != len(plain) || resp.Header.Get("Vary") != "Accept-Encoding" {
			t.Errorf("%s: %d bytes decoded, %d plain; Vary %q", enc, len(decoded), len(plain), resp.Header.Get("Vary"))
		}
		if len(raw)*10 > len(plain) {
			t.Errorf("%s: %d bytes for %d", enc, len(raw), len(plain))
		}
		sizes[enc] = len(raw)
	}
	t.Logf("a batch of 100 GETs of /users answered in %v bytes", sizes)

	// encode off: as it is.
	base = startCaddy(t, proxySite(be, "{\n\t\tencode off\n\t}"))
	resp, err := client.Do(request(t, "POST", base+"/batch", batch, "Accept-Encoding: gzip"))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.Header.Get("Content-Encoding") != "" {
		t.Errorf("encode off: %v", resp.Header)
	}
}

// NDJSON still flushes each line when compressed: the first result can be
// read before the slow operation ends.
func TestNDJSONCompressedStillStreams(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, proxySite(be, ""))
	req := request(t, "POST", base+"/batch", `[{"path":"/health"},{"path":"/slow?id=s&d=2s"}]`, "Accept: application/x-ndjson", "Accept-Encoding: gzip")
	start := time.Now()
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.Header.Get("Content-Encoding") != "gzip" {
		t.Fatalf("Content-Encoding %q", resp.Header.Get("Content-Encoding"))
	}
	gz, err := gzip.NewReader(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(gz).ReadString('\n')
	if err != nil || !strings.Contains(line, `"index":0`) {
		t.Fatalf("first line %q: %v", line, err)
	}
	for _, e := range be.eventLog() {
		if e == "end s" {
			t.Fatalf("the first line came only after the slow operation ended (%v)", time.Since(start))
		}
	}
}
