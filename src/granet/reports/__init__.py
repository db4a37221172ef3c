"""``granet report``: run directories read, grouped, tabulated and plotted; statistics over seeds."""
