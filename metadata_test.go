package batch

import (
	"fmt"
	"maps"
	"net/url"
	"strings"
	"testing"
)

// Metadata is at most 16 string pairs, keys of at most 64 bytes and values
// of at most 512, in UTF-8; anything else is refused, naming the bound.
func TestMetadataField(t *testing.T) {
	t.Parallel()
	lim := ptLimits(t, nil)
	pairs := func(n int) string {
		var kv []string
		for i := range n {
			kv = append(kv, fmt.Sprintf(`"k%d":"v"`, i))
		}
		return "{" + strings.Join(kv, ",") + "}"
	}
	body := func(md string) string { return `{"batch":[{"path":"/a"}],"metadata":` + md + `}` }
	b := ptParse(t, lim, body(`{"source":"crm","run":"2026-11-22","note":""}`))
	if !maps.Equal(b.metadata, map[string]string{"source": "crm", "run": "2026-11-22", "note": ""}) {
		t.Errorf("metadata %v", b.metadata)
	}
	if b := ptParse(t, lim, body(pairs(16))); len(b.metadata) != 16 {
		t.Errorf("16 pairs: %d", len(b.metadata))
	}
	if b := ptParse(t, lim, body(`{"`+strings.Repeat("k", 64)+`":"`+strings.Repeat("é", 256)+`"}`)); len(b.metadata) != 1 {
		t.Errorf("a 64-byte key and a 512-byte value refused")
	}
	if b := ptParse(t, lim, body(`{}`)); b.metadata != nil {
		t.Errorf("empty metadata: %v", b.metadata)
	}
	bad := map[string]string{
		pairs(17):   "metadata holds at most 16 pairs, got 17",
		pairs(1000): "metadata holds at most 16 pairs, got 1000",
		`{"` + strings.Repeat("k", 65) + `":"v"}`:  "is longer than 64 bytes",
		`{"k":"` + strings.Repeat("v", 513) + `"}`: "metadata value of \"k\" is longer than 512 bytes",
		`{"k":"` + strings.Repeat("é", 257) + `"}`: "longer than 512 bytes",
		`{"k":5}`:              "metadata value of \"k\" must be a string",
		`{"k":null}`:           "must be a string",
		`{"k":{"nested":"v"}}`: "must be a string",
		`{"":"v"}`:             "metadata keys must not be empty",
		`{"k":"a","k":"b"}`:    "metadata key \"k\" given twice",
		`["k","v"]`:            "metadata must be an object of strings",
		`"source=crm"`:         "metadata must be an object of strings",
		`{"k":"` + strings.Repeat("v", 100_000) + `"}`: "longer than 512 bytes",
	}
	for md, want := range bad {
		if faults := ptFaults(t, lim, body(md)); !strings.Contains(faults[0].Message, want) || len(faults[0].Message) > maxFaultMessage+8 {
			t.Errorf("%.80s: %v", md, faults)
		}
	}
}

// A streamed job's query may carry metadata.<key>=<value>, held to the
// same bounds.
func TestQueryMetadata(t *testing.T) {
	t.Parallel()
	cases := []struct {
		query string
		want  map[string]string
		fault string
	}{
		{"method=POST", nil, ""},
		{"metadata.source=crm&metadata.run=7&mode=parallel", map[string]string{"source": "crm", "run": "7"}, ""},
		{"metadata.note=", map[string]string{"note": ""}, ""},
		{"metadata.=x", nil, "must not be empty"},
		{"metadata.k=a&metadata.k=b", nil, "given twice"},
		{"metadata." + strings.Repeat("k", 65) + "=v", nil, "longer than 64 bytes"},
		{"metadata.k=" + strings.Repeat("v", 513), nil, "longer than 512 bytes"},
		{"metadata.k=%ff", nil, "not valid UTF-8"},
	}
	var many []string
	for i := range 17 {
		many = append(many, fmt.Sprintf("metadata.k%d=v", i))
	}
	cases = append(cases, struct {
		query string
		want  map[string]string
		fault string
	}{strings.Join(many, "&"), nil, "at most 16 pairs, got 17"})
	for _, tc := range cases {
		q, err := url.ParseQuery(tc.query)
		if err != nil {
			t.Fatal(err)
		}
		md, fault := queryMetadata(q)
		if !maps.Equal(md, tc.want) || !strings.Contains(fault, tc.fault) || (tc.fault == "") != (fault == "") {
			t.Errorf("%.80s: %v %q", tc.query, md, fault)
		}
	}
}

// A CSV batch's query takes the budget and metadata as any batch's body
// does.
func TestCSVQueryBudgetAndMetadata(t *testing.T) {
	t.Parallel()
	q, _ := url.ParseQuery("method=PATCH&path=/users/{{item.id}}&max_failures=2&max_failure_rate=0.5&metadata.src=csv&metadata.run=7")
	_, opts, faults := csvTemplate(q)
	// The envelope goes on with the operation and the items.
	if len(faults) > 0 || string(opts) != `{"max_failure_rate":0.5,"max_failures":2,"metadata":{"run":"7","src":"csv"}` {
		t.Errorf("options %s, faults %v", opts, faults)
	}
	for query, want := range map[string]string{
		"metadata.k=a&metadata.k=b": "metadata key \"k\" given twice",
		"metadata.=v":               "metadata keys must not be empty",
		"metadata.k=%ff":            "not valid UTF-8",
	} {
		q, _ := url.ParseQuery("method=PATCH&path=/u&" + query)
		if _, _, faults := csvTemplate(q); len(faults) != 1 || !strings.Contains(faults[0].Message, want) {
			t.Errorf("%s: %v", query, faults)
		}
	}
}
