package batch

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tidwall/gjson"
)

// accessLog returns the entries of a JSON access log file.
func accessLog(t *testing.T, path string) []gjson.Result {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		return nil
	}
	defer f.Close()
	var entries []gjson.Result
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		entries = append(entries, gjson.Parse(sc.Text()))
	}
	return entries
}

// Each operation gets the access log entry a lone request would, with the
// batch's id and its own; the batch request's entry names the batch and
// its counts, and log_append can use {http.batch.id}.
func TestOperationsInAccessLog(t *testing.T) {
	be := newBackend(t)
	for _, off := range []bool{false, true} {
		logFile := filepath.Join(t.TempDir(), "access.log")
		block := ""
		if off {
			block = "{\n\t\t\tlog_operations off\n\t\t}"
		}
		// log_append, ordered after batch, never sees the batch request:
		// in a route before batch, it does.
		base := startCaddy(t, `
	route /batch {
		log_append batch_id {http.batch.id}
		batch `+block+`
	}
	reverse_proxy `+be.addr()+`
	log {
		output file `+logFile+`
		format json
	}`)
		status, _, body := send(t, "POST", base+"/batch", `[{"path":"/users"},{"method":"DELETE","path":"/users/7"},{"path":"/health"}]`, alice)
		if status != 200 {
			t.Fatalf("status %d: %s", status, body)
		}
		want := 4
		if off {
			want = 1
		}
		var entries []gjson.Result
		eventually(t, 5*time.Second, fmt.Sprintf("%d access log entries", want), func() bool {
			entries = accessLog(t, logFile)
			return len(entries) >= want
		})
		if len(entries) != want {
			t.Fatalf("log_operations off=%v: %d entries, want %d:\n%v", off, len(entries), want, entries)
		}
		batchEntry := entries[len(entries)-1] // logged when the batch request ends
		id := batchEntry.Get("batch.id").String()
		if batchEntry.Get("request.uri").String() != "/batch" || len(id) != 32 || batchEntry.Get("batch.operations").Int() != 3 ||
			batchEntry.Get("batch.failed").Int() != 1 || batchEntry.Get("batch.succeeded").Int() != 2 || batchEntry.Get("batch_id").String() != id {
			t.Errorf("the batch's own entry: %s", batchEntry.Raw)
		}
		if off {
			continue
		}
		for i, w := range []struct {
			method, uri string
			status      int64
		}{{"GET", "/users", 200}, {"DELETE", "/users/7", 404}, {"GET", "/health", 200}} {
			e := entries[i]
			if e.Get("msg").String() != "handled request" || e.Get("request.method").String() != w.method ||
				e.Get("request.uri").String() != w.uri || e.Get("status").Int() != w.status ||
				e.Get("batch.id").String() != id || e.Get("batch.op_id").String() != strings.TrimSpace(string(rune('0'+i))) || e.Get("batch.index").Int() != int64(i) ||
				e.Get("request.headers.Authorization").Exists() && e.Get("request.headers.Authorization.0").String() != "REDACTED" ||
				!e.Get("duration").Exists() || !e.Get("size").Exists() || e.Get("request.remote_ip").String() != "127.0.0.1" {
				t.Errorf("entry %d: %s", i, e.Raw)
			}
		}
	}
}
