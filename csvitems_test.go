package batch

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"math/rand"
	"net/url"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/caddy-batch/batch/internal/jsontext"
)

// csvRun is what readCSVItems made of a body: items and faults as
// "line: text", and the records it counted.
type csvRun struct {
	items, faults []string
	records       int
	err           error
}

func runCSV(body io.Reader, lim csvLimits) csvRun {
	var run csvRun
	run.records, run.err = readCSVItems(body, lim,
		func(line int, obj []byte) bool {
			run.items = append(run.items, fmt.Sprintf("%d: %s", line, obj))
			return true
		},
		func(line int, msg string) bool {
			run.faults = append(run.faults, fmt.Sprintf("%d: %s", line, msg))
			return true
		})
	return run
}

func TestReadCSVItems(t *testing.T) {
	lim := csvLimits{maxRecord: 64, maxColumns: 4}
	long := strings.Repeat("n", maxCSVName)
	tests := []struct {
		name    string
		body    string
		lim     csvLimits // lim when zero
		items   []string
		faults  []string
		records int
	}{
		{name: "LF", body: "id,email\n7,a@b.c\n8,d@e.f\n",
			items: []string{`2: {"id":"7","email":"a@b.c"}`, `3: {"id":"8","email":"d@e.f"}`}, records: 2},
		{name: "CRLF, no final line end", body: "id,email\r\n7,a@b.c\r\n8,d@e.f",
			items: []string{`2: {"id":"7","email":"a@b.c"}`, `3: {"id":"8","email":"d@e.f"}`}, records: 2},
		{name: "keys in header order", body: "z,a,m\n1,2,3\n",
			items: []string{`2: {"z":"1","a":"2","m":"3"}`}, records: 1},
		{name: "BOM dropped", body: "\xef\xbb\xbf\"id\",name\n1,A\n",
			items: []string{`2: {"id":"1","name":"A"}`}, records: 1},
		{name: "BOM only", body: "\xef\xbb\xbf", faults: []string{"1: no header row: the body is empty"}},
		{name: "BOM past the start is data", body: "id\n\xef\xbb\xbfx\n",
			items: []string{"2: {\"id\":\"\ufeffx\"}"}, records: 1},
		{name: "quoted fields", body: "a,b\n\"x,y\",\"say \"\"hi\"\"\"\n",
			items: []string{`2: {"a":"x,y","b":"say \"hi\""}`}, records: 1},
		{name: "field over lines keeps later lines right", body: "id,note\n1,\"a\nb\r\nc\"\n2,x\n\"3\n\",y\n4,z\n",
			items: []string{`2: {"id":"1","note":"a\nb\nc"}`, `5: {"id":"2","note":"x"}`, `6: {"id":"3\n","note":"y"}`, `8: {"id":"4","note":"z"}`}, records: 4},
		{name: "empty lines skipped", body: "\n\na,b\n\n1,2\r\n\r\n\n3,4\n\n",
			items: []string{`5: {"a":"1","b":"2"}`, `8: {"a":"3","b":"4"}`}, records: 2},
		{name: "spaces are a record", body: "a,b\n \n1,2\n",
			faults: []string{"2: 1 field, where the header has 2"}, items: []string{`3: {"a":"1","b":"2"}`}, records: 2},
		{name: "empty cells", body: "a,b\n,\n\"\",\"\"\n",
			items: []string{`2: {"a":"","b":""}`, `3: {"a":"","b":""}`}, records: 2},
		{name: "one column", body: "a\nx\n\"\"\n\ny\n",
			items: []string{`2: {"a":"x"}`, `3: {"a":""}`, `5: {"a":"y"}`}, records: 3},
		{name: "invalid UTF-8 and NUL", body: "k\xff,n\x00\n\xfe\x00,\xe2\x82\n",
			items: []string{`2: {"k\ufffd":"\ufffd\u0000","n\u0000":"\ufffd\ufffd"}`}, records: 1},
		{name: "wrong field counts, all listed", body: "a,b\n1\n2,3\n4,5,6\n\"7\n\",8,9\n10,11\n",
			faults:  []string{"2: 1 field, where the header has 2", "4: 3 fields, where the header has 2", "5: 3 fields, where the header has 2"},
			items:   []string{`3: {"a":"2","b":"3"}`, `7: {"a":"10","b":"11"}`},
			records: 5},
		{name: "bare quote stops", body: "a,b\n1,2\n3,x\"y\n4,5\n",
			items:   []string{`2: {"a":"1","b":"2"}`},
			faults:  []string{`3: a " in a field that is not quoted, at column 4; the rest is not read`},
			records: 2},
		{name: "text after a closing quote stops", body: "a,b\n\"x\"y,2\n4,5\n",
			faults:  []string{`2: a quoted field not closed, or a " in it not doubled, at column 3; the rest is not read`},
			records: 1},
		{name: "unterminated quote", body: "a,b\n1,\"xyz\n2,3\n",
			faults:  []string{`2: a quoted field not closed, or a " in it not doubled, at line 3, column 5; the rest is not read`},
			records: 1},
		{name: "bare quote in the header", body: "a\"b,c\n1,2\n",
			faults: []string{`1: header row: a " in a field that is not quoted, at column 2; the rest is not read`}},
		{name: "no header row", body: "", faults: []string{"1: no header row: the body is empty"}},
		{name: "only empty lines", body: "\n\r\n\n", faults: []string{"1: no header row: the body is empty"}},
		{name: "header and no records", body: "a,b\n\n"},
		{name: "empty header names", body: "a,,c,\n1,2,3,4\n",
			faults: []string{"1: header row: column 2 has no name", "1: header row: column 4 has no name"}},
		{name: "duplicate header name", body: "id,name,id\n1,2,3\n",
			faults: []string{`1: header row: column 3 has the name of column 1, "id"`}},
		{name: "names that JSON reads as one", body: "\xff,\xfe,a\xff,a\ufffd\n1,2,3,4\n",
			faults: []string{`1: header row: column 2 has the name of column 1, "` + "\ufffd" + `"`,
				`1: header row: column 4 has the name of column 3, "a` + "\ufffd" + `"`}},
		{name: "names differing in case are two", body: "id,ID\n1,2\n", items: []string{`2: {"id":"1","ID":"2"}`}, records: 1},
		{name: "longest name", body: long + "\n1\n", lim: csvLimits{maxRecord: 1 << 10},
			items: []string{`2: {"` + long + `":"1"}`}, records: 1},
		{name: "name too long", body: long + "x\n1\n", lim: csvLimits{maxRecord: 1 << 10},
			faults: []string{"1: header row: the name of column 1 is longer than 256 bytes"}},
		{name: "most columns", body: "a,b,c,d\n1,2,3,4\n", items: []string{`2: {"a":"1","b":"2","c":"3","d":"4"}`}, records: 1},
		{name: "header over maxColumns", body: "a,b,c,d,e\n1,2,3,4,5\n",
			faults: []string{"1: header row: more than 4 fields; the rest is not read"}},
		{name: "record over maxColumns stops", body: "a,b\n1,2\n\"x\n\",,,,,,,,,\n3,4\n",
			items:   []string{`2: {"a":"1","b":"2"}`},
			faults:  []string{"3: more than 4 fields; the rest is not read"},
			records: 2},
		{name: "quoted commas are not fields", body: "a\n\",,,,,,,,\"\n", items: []string{`2: {"a":",,,,,,,,"}`}, records: 1},
		{name: "item of maxRecord bytes", body: "a,b\n" + strings.Repeat("x", 22) + "," + strings.Repeat("y", 27) + "\r\n",
			items: []string{`2: {"a":"` + strings.Repeat("x", 22) + `","b":"` + strings.Repeat("y", 27) + `"}`}, records: 1},
		{name: "item over maxRecord bytes", body: "a,b\n" + strings.Repeat("x", 22) + "," + strings.Repeat("y", 28) + "\r\n",
			faults: []string{"2: record is larger than max_body_size (64 bytes) as JSON"}, records: 1},
		{name: "record over maxRecord stops", body: "a,b\n1,2\n\"" + strings.Repeat("x", 100) + "\n\",3\n4,5\n",
			items:   []string{`2: {"a":"1","b":"2"}`},
			faults:  []string{"3: record is longer than max_body_size (64 bytes); the rest is not read"},
			records: 2},
		{name: "header over maxRecord", body: strings.Repeat("h", 65) + "\n1\n",
			faults: []string{"1: header row: record is longer than max_body_size (64 bytes); the rest is not read"}},
		{name: "items of maxTotal bytes", body: "a\n1\n2\n", lim: csvLimits{maxRecord: 64, maxTotal: 18},
			items: []string{`2: {"a":"1"}`, `3: {"a":"2"}`}, records: 2},
		{name: "items over maxTotal bytes stop", body: "a\n1\n2\n\n3\n", lim: csvLimits{maxRecord: 64, maxTotal: 17},
			items:   []string{`2: {"a":"1"}`},
			faults:  []string{"3: the items are larger than 17 bytes as JSON in all; the rest is not read"},
			records: 2},
		{name: "JSON over maxRecord is a fault, and reading goes on", body: "a,b\n\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00,1\n2,3\n",
			faults:  []string{"2: record is larger than max_body_size (64 bytes) as JSON"},
			items:   []string{`3: {"a":"2","b":"3"}`},
			records: 2},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l := lim
			if tt.lim != (csvLimits{}) {
				l = tt.lim
			}
			got := runCSV(strings.NewReader(tt.body), l)
			if got.err != nil {
				t.Fatalf("error: %v", got.err)
			}
			if !slices.Equal(got.items, tt.items) {
				t.Errorf("items:\n got %q\nwant %q", got.items, tt.items)
			}
			if !slices.Equal(got.faults, tt.faults) {
				t.Errorf("faults:\n got %q\nwant %q", got.faults, tt.faults)
			}
			if got.records != tt.records {
				t.Errorf("records: got %d, want %d", got.records, tt.records)
			}
			for _, it := range got.items {
				if _, obj, _ := strings.Cut(it, ": "); !json.Valid([]byte(obj)) || !utf8.ValidString(obj) || int64(len(obj)) > l.maxRecord {
					t.Errorf("item %q: not valid UTF-8 JSON within maxRecord", it)
				}
			}
		})
	}
}

// The callbacks stop the reading: a caller caps items (max_ops) and faults
// (maxFaults) as it needs.
func TestReadCSVItemsStops(t *testing.T) {
	body := "a,b\n1,2\n3\n4,5\n6\n7,8\n"
	var items, faults int
	n, err := readCSVItems(strings.NewReader(body), csvLimits{maxRecord: 64},
		func(int, []byte) bool { items++; return items < 2 },
		func(int, string) bool { faults++; return true })
	if err != nil || n != 3 || items != 2 || faults != 1 {
		t.Errorf("item stopping at 2: %d records, %d items, %d faults, %v", n, items, faults, err)
	}
	items, faults = 0, 0
	n, err = readCSVItems(strings.NewReader(body), csvLimits{maxRecord: 64},
		func(int, []byte) bool { items++; return true },
		func(int, string) bool { faults++; return false })
	if err != nil || n != 2 || items != 1 || faults != 1 {
		t.Errorf("fault stopping at 1: %d records, %d items, %d faults, %v", n, items, faults, err)
	}
	// The slice passed to item is reused: a caller that keeps it copies it.
	var kept [][]byte
	_, _ = readCSVItems(strings.NewReader("a\nxx\nyy\n"), csvLimits{maxRecord: 64},
		func(_ int, obj []byte) bool { kept = append(kept, obj); return true },
		func(int, string) bool { return true })
	if len(kept) != 2 || &kept[0][0] != &kept[1][0] {
		t.Errorf("item's slice is not reused: %q", kept)
	}
}

// An error reading the body is returned as it is, not as a fault.
func TestReadCSVItemsBodyError(t *testing.T) {
	boom := fmt.Errorf("client gone")
	for _, head := range []string{"", "a,b\n1,2\n", "a,b\n1,\"x\n"} {
		r := io.MultiReader(strings.NewReader(head), iotestErrReader{boom})
		run := runCSV(r, csvLimits{maxRecord: 64})
		if run.err != boom || len(run.faults) > 0 {
			t.Errorf("%q then an error: %v, faults %q", head, run.err, run.faults)
		}
		if head == "a,b\n1,2\n" && (len(run.items) != 1 || run.records != 1) {
			t.Errorf("%q then an error: items %q, %d records", head, run.items, run.records)
		}
	}
}

type iotestErrReader struct{ err error }

func (r iotestErrReader) Read([]byte) (int, error) { return 0, r.err }

// repeatReader reads head, then unit n times, then tail, without holding
// them: a body of any size in constant memory. read counts what was read.
type repeatReader struct {
	head, unit, tail []byte
	n, read          int64
	pos              int
}

func (r *repeatReader) Read(p []byte) (int, error) {
	total := 0
	for total < len(p) {
		var src []byte
		switch {
		case len(r.head) > 0:
			src = r.head
		case r.n > 0:
			src = r.unit[r.pos:]
		case len(r.tail) > 0:
			src = r.tail
		default:
			if total == 0 {
				return 0, io.EOF
			}
			r.read += int64(total)
			return total, nil
		}
		k := copy(p[total:], src)
		total += k
		switch {
		case len(r.head) > 0:
			r.head = r.head[k:]
		case r.n > 0:
			if r.pos += k; r.pos == len(r.unit) {
				r.pos, r.n = 0, r.n-1
			}
		default:
			r.tail = r.tail[k:]
		}
	}
	r.read += int64(total)
	return total, nil
}

// Hostile bodies cost what one record within the limits costs: the reader
// reads no further into the body than a record's bound (and a buffer) and
// allocates a small multiple of it, whatever the body's size. The bounds
// leave room for what other tests' servers allocate meanwhile; without the
// guard the first cases allocate 7.9 GB, 7.9 GB, 479 MB and 152 MB.
func TestCSVHostileBodies(t *testing.T) {
	const maxRecord = 1 << 20
	gib := int64(1 << 30)
	tests := []struct {
		name     string
		body     *repeatReader
		fault    string
		items    int
		maxRead  int64 // bytes of the body read at most; 0 for all
		maxAlloc uint64
		// mallocsPerItem bounds allocations per item, when set.
		mallocsPerItem float64
		maxTotal       int64
	}{
		{name: "1 GiB quoted field", body: &repeatReader{head: []byte("a,b\n1,\""), unit: []byte("x"), n: gib},
			fault: "2: record is longer than max_body_size (1048576 bytes); the rest is not read", maxRead: maxRecord + 16<<10, maxAlloc: 64 * maxRecord},
		{name: "1 GiB line", body: &repeatReader{unit: []byte("y"), n: gib},
			fault: "1: header row: record is longer than max_body_size (1048576 bytes); the rest is not read", maxRead: maxRecord + 16<<10, maxAlloc: 64 * maxRecord},
		{name: "a million columns in the header", body: &repeatReader{unit: []byte(","), n: 1 << 20},
			fault: "1: header row: more than 1000 fields; the rest is not read", maxRead: 1000 + 16<<10, maxAlloc: 4 << 20},
		{name: "a million fields in a record", body: &repeatReader{head: []byte("a,b\n1,2\n"), unit: []byte(","), n: 1 << 20},
			fault: "3: more than 1000 fields; the rest is not read", items: 1, maxRead: 1000 + 16<<10, maxAlloc: 4 << 20},
		{name: "long names, short records", body: &repeatReader{head: []byte(strings.Repeat("\x01", maxCSVName) + "\n"), unit: []byte("x\n"), n: 1 << 20},
			maxTotal: 1 << 20, fault: fmt.Sprintf("%d: the items are larger than 1048576 bytes as JSON in all; the rest is not read", 2+(1<<20)/1544),
			items: (1 << 20) / 1544, maxRead: 16 << 10, maxAlloc: 4 << 20},
		{name: "ten million empty lines", body: &repeatReader{head: []byte("a,b\n"), unit: []byte("\r\n"), n: 10 << 20, tail: []byte("1,2")},
			items: 1, maxAlloc: 4 << 20},
		{name: "a million NUL records", body: &repeatReader{head: []byte("a\n"), unit: []byte("\x00\x00\n"), n: 1 << 20},
			items: 1 << 20, maxAlloc: 32 << 20, mallocsPerItem: 1.1}, // the string encoding/csv makes of a record
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			var items int
			var faults []string
			_, err := readCSVItems(tt.body, csvLimits{maxRecord: maxRecord, maxTotal: tt.maxTotal},
				func(_ int, obj []byte) bool {
					if items++; items == 1 && !json.Valid(obj) {
						t.Errorf("item %q", obj)
					}
					return true
				},
				func(line int, msg string) bool {
					faults = append(faults, fmt.Sprintf("%d: %s", line, msg))
					return true
				})
			runtime.ReadMemStats(&after)
			if err != nil {
				t.Fatal(err)
			}
			if want := []string{tt.fault}; tt.fault == "" && len(faults) > 0 || tt.fault != "" && !slices.Equal(faults, want) {
				t.Errorf("%d faults %q…, want %q", len(faults), faults[:min(len(faults), 3)], tt.fault)
			}
			if items != tt.items {
				t.Errorf("%d items, want %d", items, tt.items)
			}
			if tt.maxRead > 0 && tt.body.read > tt.maxRead {
				t.Errorf("read %d bytes of the body, more than %d", tt.body.read, tt.maxRead)
			}
			if got := after.TotalAlloc - before.TotalAlloc; got > tt.maxAlloc {
				t.Errorf("allocated %d bytes, more than %d", got, tt.maxAlloc)
			}
			if got := float64(after.Mallocs-before.Mallocs) / float64(items); tt.mallocsPerItem > 0 && got > tt.mallocsPerItem {
				t.Errorf("%.2f allocations per item, more than %.2f", got, tt.mallocsPerItem)
			}
		})
	}
}

// The guard stops a record at its bounds, counting what csv.Reader counts:
// a record's bytes but its line end, and fields outside quotes.
func TestCSVGuard(t *testing.T) {
	tests := []struct {
		name string
		body string
		err  string // "" when all of it passes
	}{
		{"record of 8 bytes", "a,b\n12345678\n", ""},
		{"record of 8 bytes, CR counted", "1234567\r\n", ""},
		{"record of 9 bytes", "a,b\n123456789\n1\n", "line 2: record is longer than max_body_size (8 bytes)"},
		{"CR past the bound", "12345678\r\n", "line 1: record is longer than max_body_size (8 bytes)"},
		{"quoted line ends are the record's", "a\n\"12\n34\n5\"\n", "line 2: record is longer than max_body_size (8 bytes)"},
		{"empty lines are no record", "\n\n\n\n\n\n\n\n\n\n\n\n1\n", ""},
		{"4 fields", ",,,\n", ""},
		{"5 fields", "a\n\n,,,,\n", "line 3: more than 4 fields"},
		{"quoted commas", "\",,,,\",1\n", ""},
		{"a doubled quote", "\"\"\"\",,,\n", ""},
		{"a doubled quote, 5 fields", "\"\"\"\",,,,\n", "line 1: more than 4 fields"},
		{"a doubled quote, a comma", "\"a\"\",\",1\n", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			g := &csvGuard{r: strings.NewReader(tt.body), lim: csvLimits{maxRecord: 8, maxColumns: 4}, line: 1, fields: 1}
			got, err := io.ReadAll(g)
			switch {
			case tt.err == "" && (err != nil || string(got) != tt.body):
				t.Errorf("%q: read %q, %v", tt.body, got, err)
			case tt.err != "" && (err == nil || err.Error() != tt.err):
				t.Errorf("%q: error %v, want %s", tt.body, err, tt.err)
			case tt.err != "" && !strings.HasPrefix(tt.body, string(got)):
				t.Errorf("%q: read %q", tt.body, got)
			}
		})
	}
}

// jsonStringLen must be what jsontext.AppendString writes, or an item could pass its
// bound.
func TestJSONStringLen(t *testing.T) {
	rng := rand.New(rand.NewSource(1))
	special := []byte{0, 1, '\t', '\n', '\r', 0x1f, '"', '\\', 0x7f, 0x80, 0xbf, 0xc2, 0xe2, 0xed, 0xef, 0xf0, 0xf4, 0xff}
	cases := []string{"", "plain", "é€😀", "\xff", "\xed\xa0\x80", "\xe2\x82", "\u2028"}
	for range 20000 {
		b := make([]byte, rng.Intn(16))
		for i := range b {
			if rng.Intn(2) == 0 {
				b[i] = special[rng.Intn(len(special))]
			} else {
				b[i] = byte(rng.Intn(256))
			}
		}
		cases = append(cases, string(b))
	}
	for _, s := range cases {
		if got, want := jsonStringLen(s), len(jsontext.AppendString(nil, s)); got != want {
			t.Fatalf("%q: %d, jsontext.AppendString writes %d", s, got, want)
		}
	}
}

// An object is cut at its bound exactly: one byte more or less decides.
func TestAppendCSVObjectBound(t *testing.T) {
	keys := [][]byte{[]byte(`"a":`), []byte(`"b":`)}
	rec := []string{"x\x00", "\xff"}
	whole, ok := appendCSVObject(nil, keys, rec, 1<<10)
	if !ok || string(whole) != `{"a":"x\u0000","b":"\ufffd"}` {
		t.Fatalf("%s %v", whole, ok)
	}
	if obj, ok := appendCSVObject(nil, keys, rec, int64(len(whole))); !ok || !bytes.Equal(obj, whole) {
		t.Errorf("at its own size: %s %v", obj, ok)
	}
	if obj, ok := appendCSVObject(nil, keys, rec, int64(len(whole)-1)); ok || len(obj) > len(whole)-1 {
		t.Errorf("one byte short: %s %v", obj, ok)
	}
}

// BenchmarkCSVItems reads a 100,000-row, 5-column CSV into items.
func BenchmarkCSVItems(b *testing.B) {
	const rows = 100_000
	var sb strings.Builder
	sb.WriteString("id,email,name,account_id,status\n")
	for i := range rows {
		fmt.Fprintf(&sb, "%d,user%d@example.com,\"User %d, Jr.\",acct-%d,active\n", i, i, i, i%50)
	}
	body := sb.String()
	b.SetBytes(int64(len(body)))
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	start := time.Now()
	iters := 0
	for b.Loop() {
		n, err := readCSVItems(strings.NewReader(body), csvLimits{maxRecord: 10 << 20},
			func(int, []byte) bool { return true },
			func(line int, msg string) bool { b.Fatalf("line %d: %s", line, msg); return false })
		if err != nil || n != rows {
			b.Fatalf("%d records: %v", n, err)
		}
		iters++
	}
	elapsed := time.Since(start)
	runtime.ReadMemStats(&after)
	items := float64(iters * rows)
	b.ReportMetric(items/elapsed.Seconds(), "items/s")
	b.ReportMetric(float64(after.Mallocs-before.Mallocs)/items, "allocs/item")
	b.ReportMetric(float64(after.TotalAlloc-before.TotalAlloc)/items, "B/item")
}

// A CSV batch: its rows are the items of the operation the query gives,
// sync or as a job whose results read as JSON and NDJSON; a fault names
// its line, and nothing runs on any.
func TestCSVBatch(t *testing.T) {
	be := newBackend(t)
	be.seed("a", "b", "c")
	base := startCaddy(t, proxySite(be, `{
		max_ops 5
		async {
			workers 2
		}
	}`))
	csvType := "Content-Type: text/csv; charset=utf-8"
	patch := "?method=PATCH&path=/users/{{item.id}}&body=" + url.QueryEscape(`{"name":"{{item.name}}"}`)
	_, _, body := send(t, "POST", base+"/batch"+patch+"&header=X-Row:{{item.id}}", "id,name\r\n1,Ann\r\n2,\"Bob, Jr\"\r\n", csvType)
	res := mustJSON(t, body)
	if res.Get("succeeded").Int() != 2 || res.Get("results.1.body.name").String() != "Bob, Jr" {
		t.Fatalf("sync CSV: %s", body)
	}
	if u, _ := be.API.Get(1); u.Name != "Ann" {
		t.Errorf("user 1 is %q", u.Name)
	}
	sent := len(be.requests())
	for name, c := range map[string]struct {
		query, body, header string
		status              int
		want                string
	}{
		"field count":     {"?method=PATCH&path=/users/{{item.id}}", "id,name\n1,x\n2\n\n3,y,z\n", csvType, 400, `"line 3: 1 field, where the header has 2"`},
		"both faults":     {"?method=PATCH&path=/users/{{item.id}}", "id,name\n1,x\n2\n3,y,z\n", csvType, 400, `"line 4: 3 fields, where the header has 2"`},
		"missing column":  {"?method=PATCH&path=/users/{{item.uid}}", "id,name\n1,x\n2,y\n", csvType, 400, `"line 3: path: no \"uid\" in the item"`},
		"bare quote":      {"?method=PATCH&path=/users/{{item.id}}", "id,name\n1,x\"y\n", csvType, 400, `line 2: a \" in a field that is not quoted`},
		"no operation":    {"", "id\n1\n", csvType, 400, "needs its operation in the query"},
		"unknown param":   {"?method=PATCH&path=/a&colour=red", "id\n1\n", csvType, 400, `unknown query parameter \"colour\"`},
		"empty":           {"?method=PATCH&path=/a", "", csvType, 400, "no header row"},
		"too many rows":   {"?method=PATCH&path=/a", "id\n1\n2\n3\n4\n5\n6\n", csvType, 413, "more than the 5 rows allowed"},
		"no content type": {"?method=PATCH&path=/a", "id\n1\n", "Content-Type:", 415, ""},
		"form":            {"?method=PATCH&path=/a", "id\n1\n", "Content-Type: text/plain", 415, ""},
	} {
		status, _, body := send(t, "POST", base+"/batch"+c.query, c.body, c.header)
		if status != c.status || !strings.Contains(body, c.want) {
			t.Errorf("%s: %d %s", name, status, body)
		}
	}
	if n := len(be.requests()); n != sent {
		t.Errorf("refused CSV batches reached the backend %d times", n-sent)
	}

	// Async: streamed into storage, as many rows as the job may hold.
	var csv strings.Builder
	csv.WriteString("id,name\n")
	for i := range 12 {
		fmt.Fprintf(&csv, "%d,n%d\n", i%3+1, i)
	}
	status, _, body := send(t, "POST", base+"/batch"+patch+"&mode=parallel", csv.String(), csvType, alice, "Prefer: respond-async")
	if status != 202 {
		t.Fatalf("async CSV: %d %s", status, body)
	}
	id := mustJSON(t, body).Get("id").String()
	if p := waitJob(t, base+"/batch/"+id, alice, "completed"); p.Get("succeeded").Int() != 12 {
		t.Errorf("job: %s", p.Raw)
	}
	_, _, body = send(t, "GET", base+"/batch/"+id+"/results", "", alice)
	if res := mustJSON(t, body); res.Get("results.#").Int() != 12 || res.Get("results.11.body.name").String() != "n11" ||
		res.Get("results.11.id").String() != "11" {
		t.Errorf("results as JSON: %.300s", body)
	}
	_, _, body = send(t, "GET", base+"/batch/"+id+"/results", "", alice, "Accept: application/x-ndjson")
	if lines := strings.Split(strings.TrimSpace(body), "\n"); len(lines) != 13 || !strings.Contains(lines[12], `"summary":true`) {
		t.Errorf("results as NDJSON: %.300s", body)
	}
	status, _, body = send(t, "POST", base+"/batch?method=PATCH&path=/users/{{item.id}}", "id,name\n1,x\n2\n", csvType, alice, "Prefer: respond-async")
	if status != 400 || !strings.Contains(body, "line 3: 1 field, where the header has 2") {
		t.Errorf("async CSV with a fault: %d %s", status, body)
	}
}
